//! Announced frame lengths pin no memory (a counting allocator watches this
//! test binary while member connections announce the largest frame and send a
//! kilobyte of it).

mod common;

ha_transport_testkit::memory_test!(common::Tcp);
