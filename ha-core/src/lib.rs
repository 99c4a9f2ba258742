//! `ha-core`: the types, traits and sans-IO replication engine of a hot-standby
//! high-availability replication system.
//!
//! A library consumer imports only this crate; it pulls in no network or TLS stack.
//!
//! - [`types`], [`config`], [`message`], [`health`], [`error`]: the public vocabulary.
//! - [`transport`], [`log_store`], [`state_machine`]: the traits other crates implement.
//! - [`wire`] (the frame codec) and [`backoff`] (reconnect pacing): what every
//!   transport shares.
//! - [`engine`]: the protocol as a deterministic state machine (events in, actions out).
//! - [`executor`]: carries out the engine's actions in order over a log store, a
//!   state machine and a host; the driver and the simulator share it.
//! - [`driver`]: runs the engine over a transport, a log store and a state machine on
//!   tokio, and implements [`replicator::Replicator`].
//! - `testkit` (feature `testkit`): in-memory implementations, conformance suites and
//!   the deterministic simulator.

pub mod backoff;
pub mod config;
pub mod driver;
pub mod engine;
pub mod error;
pub mod executor;
pub mod health;
pub mod histogram;
pub mod latch;
pub mod log_store;
pub mod message;
pub mod observe;
pub mod ratelimit;
pub mod replicator;
pub mod state_machine;
pub mod transport;
pub mod types;
pub mod wire;

#[cfg(feature = "testkit")]
pub mod testkit;

pub use config::{Config, ConfigError, ConfiguredRole, Member, DEFAULT_ASYNC_LAG};
pub use driver::{Bootstrap, Node, NodeBuilder};
pub use error::{Error, StorageError, TransportError};
pub use health::{HealthStatus, PeerStatus};
pub use log_store::{LogStore, Snapshot, SnapshotWriter};
pub use replicator::{PromoteOptions, ReadConsistency, ReplicationMode, Replicator, WriteAck};
pub use state_machine::{StateCapture, StateMachine};
pub use transport::Transport;
pub use types::{
    Command, CommitMode, HardState, Instant, LogIndex, MemberKind, NodeId, Payload, Position, Role,
    Term, WalEntry,
};
