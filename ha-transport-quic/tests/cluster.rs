//! The shared end-to-end cluster over QUIC: driver, real `Wal` files, failover,
//! restart on the same address, rejoin and catch-up, no acknowledged write lost.

mod common;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_and_rejoin_over_quic_and_real_files_lose_no_acknowledged_write() {
    ha_transport_testkit::cluster::failover_and_rejoin::<common::Quic>().await;
}
