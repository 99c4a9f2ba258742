//! [`NodeBuilder`]: how a consumer puts a [`Node`] together.
//!
//! ```
//! # use ha_core::driver::{Bootstrap, NodeBuilder};
//! # use ha_core::testkit::memory::{KvStateMachine, MemLogStore, MemNetwork};
//! # use ha_core::{Config, Member, MemberKind, NodeId};
//! let peers = vec![
//!     Member { id: NodeId(2), addr: "n2".into(), kind: MemberKind::Data },
//!     Member { id: NodeId(3), addr: "n3".into(), kind: MemberKind::Witness },
//! ];
//! let config = Config::new(NodeId(1), MemberKind::Data, "n1", peers);
//! let network = MemNetwork::new();
//! let node = NodeBuilder::new(config)
//!     .transport(network.transport(NodeId(1)))
//!     .log_store(MemLogStore::new())
//!     .state_machine(KvStateMachine::new())
//!     .bootstrap(Bootstrap::NewCluster)
//!     .build()
//!     .expect("a valid config whose id the transport speaks for");
//! # let _ = node;
//! ```
//!
//! The transport, log store and state machine are type parameters the builder
//! fills in, so a node without one of them does not compile.

use std::hash::BuildHasher;

use super::{Bootstrap, Node};
use crate::config::Config;
use crate::error::Error;
use crate::log_store::LogStore;
use crate::state_machine::StateMachine;
use crate::transport::Transport;

/// A part the builder has not been given yet.
#[derive(Clone, Copy, Debug, Default)]
pub struct Missing;

/// Puts a [`Node`] together: [`NodeBuilder::new`] with the config, then the
/// transport, the log store and the state machine, then [`NodeBuilder::build`].
#[derive(Debug)]
pub struct NodeBuilder<T = Missing, L = Missing, S = Missing> {
    config: Config,
    transport: T,
    store: L,
    state_machine: S,
    bootstrap: Bootstrap,
    seed: Option<u64>,
}

impl NodeBuilder {
    /// A builder for a node with `config`. It joins an existing cluster unless
    /// told to bootstrap a new one ([`NodeBuilder::bootstrap`]).
    pub fn new(config: Config) -> Self {
        NodeBuilder {
            config,
            transport: Missing,
            store: Missing,
            state_machine: Missing,
            bootstrap: Bootstrap::JoinExisting,
            seed: None,
        }
    }
}

impl<T, L, S> NodeBuilder<T, L, S> {
    /// The transport to the peers. Its [`Transport::local_id`] must be the
    /// config's node id.
    pub fn transport<T2: Transport>(self, transport: T2) -> NodeBuilder<T2, L, S> {
        NodeBuilder {
            config: self.config,
            transport,
            store: self.store,
            state_machine: self.state_machine,
            bootstrap: self.bootstrap,
            seed: self.seed,
        }
    }

    /// The durable log (ha-wal's `Wal`, or the test kit's in-memory one).
    pub fn log_store<L2: LogStore>(self, store: L2) -> NodeBuilder<T, L2, S> {
        NodeBuilder {
            config: self.config,
            transport: self.transport,
            store,
            state_machine: self.state_machine,
            bootstrap: self.bootstrap,
            seed: self.seed,
        }
    }

    /// The application state the log is applied to.
    pub fn state_machine<S2: StateMachine>(self, state_machine: S2) -> NodeBuilder<T, L, S2> {
        NodeBuilder {
            config: self.config,
            transport: self.transport,
            store: self.store,
            state_machine,
            bootstrap: self.bootstrap,
            seed: self.seed,
        }
    }

    /// How a node whose data directory is empty enters the cluster (a stored
    /// state is always used as it is). Only [`Bootstrap::NewCluster`] creates a
    /// cluster; the default is [`Bootstrap::JoinExisting`] (as a non-voter until
    /// caught up).
    pub fn bootstrap(mut self, bootstrap: Bootstrap) -> Self {
        self.bootstrap = bootstrap;
        self
    }

    /// Fixes the seed of the node's randomness (election and reconnect jitter),
    /// for reproducible tests. By default each process draws its own.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }
}

impl<T: Transport, L: LogStore, S: StateMachine> NodeBuilder<T, L, S> {
    /// Checks the parts and builds the node; nothing runs until
    /// [`Replicator::start`](crate::Replicator::start).
    ///
    /// Fails with [`Error::InvalidConfig`] naming the field if the config does not
    /// validate, and with [`Error::IdentityMismatch`] if the transport speaks for
    /// another node than the config names.
    pub fn build(self) -> Result<Node<T, L, S>, Error> {
        self.config.validate()?;
        let transport_id = self.transport.local_id();
        if transport_id != self.config.node_id {
            return Err(Error::IdentityMismatch {
                configured: self.config.node_id,
                transport: transport_id,
            });
        }
        let seed = self.seed.unwrap_or_else(|| {
            std::collections::hash_map::RandomState::new().hash_one(self.config.node_id.0)
        });
        Node::from_parts(
            self.config,
            self.transport,
            self.store,
            self.state_machine,
            self.bootstrap,
            seed,
        )
    }
}
