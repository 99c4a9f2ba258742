//! [`ConnectionTally`]: how many connections each peer opened with this node,
//! by direction, as both transports count them for metrics.
//!
//! Only authenticated members are counted (a connection is counted once its
//! peer proved its identity), so the label set is bounded by the membership.

use std::collections::BTreeMap;

use ha_core::types::NodeId;
use parking_lot::Mutex;

/// Who dialed a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Direction {
    /// The peer dialed this node.
    Inbound,
    /// This node dialed the peer.
    Outbound,
}

impl Direction {
    /// Both directions, in the order [`PeerConnections`] reports them.
    pub const ALL: [Direction; 2] = [Direction::Inbound, Direction::Outbound];

    /// Its name as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }

    fn index(self) -> usize {
        match self {
            Direction::Inbound => 0,
            Direction::Outbound => 1,
        }
    }
}

/// The connections of one peer: open now, and opened since start, by
/// direction (indexed like [`Direction::ALL`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerConnections {
    /// The peer.
    pub peer: NodeId,
    /// Connections open now, inbound then outbound.
    pub open: [u64; 2],
    /// Connections opened since start (authenticated), inbound then outbound.
    pub opened: [u64; 2],
}

impl PeerConnections {
    /// Open connections in `direction`.
    pub fn open(&self, direction: Direction) -> u64 {
        self.open[direction.index()]
    }

    /// Connections opened in `direction` since start.
    pub fn opened(&self, direction: Direction) -> u64 {
        self.opened[direction.index()]
    }
}

/// Counts the connections opened per peer and direction.
#[derive(Debug, Default)]
pub struct ConnectionTally {
    opened: Mutex<BTreeMap<NodeId, [u64; 2]>>,
}

impl ConnectionTally {
    /// Counts one authenticated connection with `peer`.
    pub fn opened(&self, peer: NodeId, direction: Direction) {
        self.opened.lock().entry(peer).or_default()[direction.index()] += 1;
    }

    /// One row per member in `members` other than `me` (so a peer never
    /// reached still has its zeros), its open connections from
    /// `open(peer, direction)`.
    pub fn report(
        &self,
        me: NodeId,
        members: &[NodeId],
        open: impl Fn(NodeId, Direction) -> usize,
    ) -> Vec<PeerConnections> {
        let opened = self.opened.lock().clone();
        members
            .iter()
            .copied()
            .filter(|p| *p != me)
            .map(|peer| PeerConnections {
                peer,
                open: Direction::ALL.map(|d| open(peer, d) as u64),
                opened: opened.get(&peer).copied().unwrap_or_default(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opened_connections_are_counted_per_peer_and_direction() {
        let tally = ConnectionTally::default();
        tally.opened(NodeId(2), Direction::Outbound);
        tally.opened(NodeId(2), Direction::Outbound);
        tally.opened(NodeId(2), Direction::Inbound);
        let rows = tally.report(NodeId(1), &[NodeId(1), NodeId(2), NodeId(3)], |peer, d| {
            usize::from(peer == NodeId(2) && d == Direction::Inbound)
        });
        assert_eq!(rows.len(), 2, "a row for every member but this node");
        assert_eq!(rows[0].peer, NodeId(2));
        assert_eq!(rows[0].opened(Direction::Outbound), 2);
        assert_eq!(rows[0].opened(Direction::Inbound), 1);
        assert_eq!(rows[0].open(Direction::Inbound), 1);
        assert_eq!(rows[0].open(Direction::Outbound), 0);
        assert_eq!(
            rows[1],
            PeerConnections {
                peer: NodeId(3),
                ..PeerConnections::default()
            }
        );
    }
}
