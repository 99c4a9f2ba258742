//! Embedding the replication layer: three members in one process (two data nodes
//! and a witness) over mutually authenticated QUIC on loopback, each data node
//! with a durable write-ahead log (`ha-wal`) and this program's own state machine.
//! It writes, stops the primary, shows the standby taking over with every
//! acknowledged write, and writes on.
//!
//! ```sh
//! cargo run -p ha-transport-quic --example failover
//! ```

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use ha_core::driver::{Bootstrap, Node, NodeBuilder};
use ha_core::{
    Command, Config, LogIndex, Member, MemberKind, NodeId, Position, ReadConsistency, Replicator,
    StateMachine, StorageError,
};
use ha_tls::certs::{CertificateAuthority, Identity, NodeCertSpec};
use ha_transport_quic::{QuicOptions, QuicTransport};
use ha_wal::{Wal, WalConfig};

/// A tiny state machine of named notes: `"name=text"` commands set a note, a
/// query is a name. Its snapshot is one `name\ttext` line per note.
#[derive(Default)]
struct Notes {
    notes: BTreeMap<String, String>,
    applied: LogIndex,
}

impl StateMachine for Notes {
    /// A few notes: serialized in `capture` itself (a large state would hand out
    /// a cheap capture, such as a clone of a persistent map, and serialize it in
    /// `StateCapture::serialize`, off the engine task).
    type Capture = Vec<u8>;

    fn apply(&mut self, position: Position, command: &Command) -> Vec<u8> {
        self.applied = position.index;
        let text = String::from_utf8_lossy(&command.0);
        match text.split_once('=') {
            Some((name, note)) => {
                self.notes.insert(name.to_owned(), note.to_owned());
                b"ok".to_vec()
            }
            None => b"not a note: expected name=text".to_vec(),
        }
    }

    fn apply_noop(&mut self, position: Position) {
        self.applied = position.index;
    }

    fn query(&self, query: &[u8]) -> Vec<u8> {
        let name = String::from_utf8_lossy(query);
        self.notes
            .get(name.as_ref())
            .map(|n| n.as_bytes().to_vec())
            .unwrap_or_default()
    }

    fn applied_index(&self) -> LogIndex {
        self.applied
    }

    fn capture(&self) -> Vec<u8> {
        let mut out = String::new();
        for (name, note) in &self.notes {
            out.push_str(&format!(
                "{}\t{}\n",
                name.replace(['\t', '\n'], " "),
                note.replace(['\t', '\n'], " ")
            ));
        }
        out.into_bytes()
    }

    fn restore(
        &mut self,
        index: LogIndex,
        data: &mut dyn std::io::Read,
    ) -> Result<(), StorageError> {
        let data = ha_core::state_machine::read_all(data)?;
        let text = std::str::from_utf8(&data)
            .map_err(|e| StorageError::Corrupt(format!("notes snapshot: {e}")))?;
        let mut notes = BTreeMap::new();
        for line in text.lines() {
            let (name, note) = line
                .split_once('\t')
                .ok_or_else(|| StorageError::Corrupt(format!("notes snapshot line {line:?}")))?;
            notes.insert(name.to_owned(), note.to_owned());
        }
        self.notes = notes;
        self.applied = index;
        Ok(())
    }

    fn reset(&mut self) {
        *self = Notes::default();
    }
}

type NotesNode = Node<QuicTransport, Wal, Notes>;

const IDS: [NodeId; 3] = [NodeId(1), NodeId(2), NodeId(3)];
const WITNESS: NodeId = NodeId(3);
const TIMEOUT: Duration = Duration::from_secs(10);

fn kind(id: NodeId) -> MemberKind {
    if id == WITNESS {
        MemberKind::Witness
    } else {
        MemberKind::Data
    }
}

/// Free loopback ports, one per member (bound together so they differ).
fn loopback_addresses() -> std::io::Result<Vec<SocketAddr>> {
    let sockets = IDS
        .iter()
        .map(|_| UdpSocket::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    sockets.iter().map(|s| s.local_addr()).collect()
}

fn build_node(
    id: NodeId,
    addrs: &[SocketAddr],
    ca: &CertificateAuthority,
    dir: &std::path::Path,
) -> Result<NotesNode, Box<dyn std::error::Error>> {
    let peers = IDS
        .iter()
        .zip(addrs)
        .filter(|(m, _)| **m != id)
        .map(|(m, a)| Member {
            id: *m,
            addr: a.to_string(),
            kind: kind(*m),
        })
        .collect();
    let bind = addrs[(id.0 - 1) as usize];
    let config = Config::new(id, kind(id), bind.to_string(), peers);
    let cert = ca.issue(&NodeCertSpec::new(id, 30))?;
    let identity = Identity::from_pem(&ca.cert_pem(), &cert.cert_pem, &cert.key_pem)?;
    let transport = QuicTransport::new(&identity, QuicOptions::for_node(&config)?)?;
    let wal = Wal::open(dir.join(format!("node-{}", id.0)), WalConfig::default())?;
    Ok(NodeBuilder::new(config)
        .transport(transport)
        .log_store(wal)
        .state_machine(Notes::default())
        .bootstrap(Bootstrap::NewCluster)
        .build()?)
}

/// The writable primary among `nodes`, waiting (bounded) for one: each node's
/// published status is watched in turn for a short while.
async fn primary(nodes: &[&NotesNode]) -> Result<NotesNode, Box<dyn std::error::Error>> {
    let deadline = Instant::now() + TIMEOUT;
    while Instant::now() < deadline {
        for n in nodes {
            if n.wait_status(|s| s.writable, Duration::from_millis(25))
                .await
                .is_ok()
            {
                return Ok((*n).clone());
            }
        }
    }
    Err("no primary was elected in time".into())
}

async fn write(
    node: &NotesNode,
    name: &str,
    note: &str,
) -> Result<u64, Box<dyn std::error::Error>> {
    let ack = node
        .apply(Command(format!("{name}={note}").into_bytes()), TIMEOUT)
        .await?;
    Ok(ack.position.index.0)
}

async fn read(node: &NotesNode, name: &str) -> Result<String, Box<dyn std::error::Error>> {
    let bytes = node
        .read(
            name.as_bytes().to_vec(),
            ReadConsistency::Linearizable,
            TIMEOUT,
        )
        .await?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let addrs = loopback_addresses()?;
    let ca = CertificateAuthority::generate("notes example CA", 30)?;
    let nodes: Vec<NotesNode> = IDS
        .iter()
        .map(|id| build_node(*id, &addrs, &ca, dir.path()))
        .collect::<Result<_, _>>()?;
    for n in &nodes {
        n.start().await?;
    }
    println!("three members on loopback: data nodes n1 and n2, witness n3 (QUIC, mutual TLS, write-ahead logs in {})", dir.path().display());

    let all: Vec<&NotesNode> = nodes.iter().collect();
    let first = primary(&all).await?;
    println!("{} is primary in term {}", first.node_id(), first.term());
    for i in 0..20 {
        write(
            &first,
            &format!("note-{i}"),
            &format!("written through {}", first.node_id()),
        )
        .await?;
    }
    println!("20 notes acknowledged (sync commit: on both data nodes' disks)");

    println!("stopping the primary {}", first.node_id());
    let stopped_at = Instant::now();
    first.shutdown().await?;
    let others: Vec<&NotesNode> = nodes
        .iter()
        .filter(|n| n.node_id() != first.node_id())
        .collect();
    let second = primary(&others).await?;
    let index = write(&second, "after-failover", "the standby took over").await?;
    println!(
        "{} took over in term {}; first write acknowledged at index {index}, {:.0} ms after the stop",
        second.node_id(),
        second.term(),
        stopped_at.elapsed().as_secs_f64() * 1e3
    );
    for i in [0, 19] {
        let note = read(&second, &format!("note-{i}")).await?;
        if note.is_empty() {
            return Err(format!("note-{i} was lost").into());
        }
        println!("note-{i} on the new primary: {note:?}");
    }
    println!("every acknowledged note is on the new primary");
    for n in &nodes {
        n.shutdown().await?;
    }
    Ok(())
}
