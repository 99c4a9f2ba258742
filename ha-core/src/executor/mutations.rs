//! Executor rules that tests switch off (testkit only).

/// Executor rules that tests switch off, to prove the simulator catches a driver
/// that breaks them. Every field is `false` in production; the setter exists only
/// with the `testkit` feature.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExecutorMutations {
    /// The first hard-state write of a step runs after the first send or response
    /// that follows it, instead of before.
    pub send_before_durable: bool,
    /// Write acknowledgements and read answers leave without the lease re-check.
    pub no_lease_recheck: bool,
}
