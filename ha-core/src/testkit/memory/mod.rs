//! In-memory implementations of the core traits, for tests and the simulator:
//!
//! - [`MemLogStore`]: a [`LogStore`](crate::log_store::LogStore) that is durable at
//!   once; clones share the log.
//! - [`SnapshotFiles`]: snapshot bytes in memory, kept as the contract says.
//! - [`KvStateMachine`]: a key-value [`StateMachine`](crate::state_machine::StateMachine)
//!   driven by postcard-encoded [`KvCommand`]s.
//! - [`MemNetwork`], [`MemTransport`], [`MemConnection`]: an in-process
//!   [`Transport`](crate::transport::Transport) with fault hooks (cut, heal,
//!   one-way cut, isolate), and [`MemHarness`] to run the transport conformance
//!   suite over it.

mod kv;
mod log_store;
mod network;
mod snapshots;

pub use kv::{KvCapture, KvCommand, KvError, KvMap, KvStateMachine, KV_ERROR_TAG};
pub(crate) use log_store::retention_point;
pub use log_store::{MemLogStore, DEFAULT_RETAIN_MAX};
pub use network::{MemConnection, MemHarness, MemNetwork, MemTransport, MAX_FRAME_BYTES};
pub use snapshots::SnapshotFiles;
