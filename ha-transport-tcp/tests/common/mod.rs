//! The TCP stack the shared scaffold's tests run over.

pub use ha_transport_tcp::testkit::Tcp;
