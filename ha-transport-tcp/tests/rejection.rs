//! The shared rejection suite over TCP: only members get in, bad frames and
//! silent connections close only their connection.

mod common;

ha_transport_testkit::rejection_tests!(common::Tcp);
