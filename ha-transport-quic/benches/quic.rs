//! QUIC transport over loopback: WAL streaming throughput (100 B and 4 KiB
//! entries), control RPC round trip idle and heartbeat round trip under a
//! saturated WAL stream (the shared `ha_transport_testkit::bench`, so the
//! figures match the TCP bench's).
//!
//! `cargo bench -p ha-transport-quic --bench quic`
#![allow(missing_docs)]

fn main() {
    ha_transport_testkit::bench::bench_main::<ha_transport_quic::testkit::Quic>("quic");
}
