//! Test kit (feature `testkit`): in-memory implementations of the traits,
//! conformance suites any implementation can run, and the deterministic simulator.

pub mod conformance;
pub mod memory;
pub mod nodes;
pub mod sim;
