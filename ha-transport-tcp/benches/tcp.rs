//! TCP transport over loopback: WAL streaming throughput (100 B and 4 KiB
//! entries), control RPC round trip idle and heartbeat round trip under a
//! saturated WAL stream (the shared `ha_transport_testkit::bench`, so the
//! figures match the QUIC bench's).
//!
//! `cargo bench -p ha-transport-tcp --bench tcp`
#![allow(missing_docs)]

fn main() {
    ha_transport_testkit::bench::bench_main::<ha_transport_tcp::testkit::Tcp>("tcp");
}
