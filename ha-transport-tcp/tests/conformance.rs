//! ha-core's transport conformance suite over TCP + TLS on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use ha_transport_testkit::StackHarness;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transport_suite_multi_thread() {
    ha_core::testkit::conformance::transport_suite(&StackHarness::<common::Tcp>::new()).await;
}

#[tokio::test(flavor = "current_thread")]
async fn transport_suite_current_thread() {
    ha_core::testkit::conformance::transport_suite(&StackHarness::<common::Tcp>::new()).await;
}
