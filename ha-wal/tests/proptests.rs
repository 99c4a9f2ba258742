//! Property tests: random append / truncate / purge / snapshot / reopen sequences
//! against a simple Vec model (and `ha_core`'s in-memory store as a second oracle),
//! and arbitrary bytes fed to the record decoder and to `Wal::open`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::Path;

use ha_core::log_store::{LogStore, Snapshot, StoredState};
use ha_core::testkit::memory::MemLogStore;
use ha_core::types::{Command, HardState, LogIndex, NodeId, Payload, Position, Term, WalEntry};
use ha_core::StorageError;
use ha_wal::format::{decode_record, encode_record, segment_file_name, SegmentHeader};
use ha_wal::{Wal, WalConfig};
use proptest::prelude::*;

fn term(n: u64) -> Term {
    Term {
        number: n,
        node: NodeId(1),
    }
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(f)
}

/// The model: the log's start, the entries after it, the snapshot, the hard state.
#[derive(Debug, Default)]
struct Model {
    base: Position,
    entries: Vec<WalEntry>,
    snapshot: Option<Snapshot>,
    hard_state: Option<HardState>,
}

type Outcome = Result<(), &'static str>;

impl Model {
    fn last(&self) -> Position {
        self.entries.last().map(|e| e.position).unwrap_or(self.base)
    }

    fn snap_index(&self) -> u64 {
        self.snapshot
            .as_ref()
            .map(|s| s.last_included.index.0)
            .unwrap_or(0)
    }

    /// The position of the entry at `index`, if held (or the base).
    fn position(&self, index: u64) -> Option<Position> {
        if index == self.base.index.0 {
            return Some(self.base);
        }
        let k = index.checked_sub(self.base.index.0 + 1)? as usize;
        self.entries.get(k).map(|e| e.position)
    }

    fn append(&mut self, batch: &[WalEntry]) -> Outcome {
        let mut prev = self.last();
        for e in batch {
            if !e.verify() || e.index() != prev.index.next() || e.term() < prev.term {
                return Err("invalid");
            }
            prev = e.position;
        }
        self.entries.extend_from_slice(batch);
        Ok(())
    }

    fn truncate(&mut self, from: u64) -> Outcome {
        if from <= self.base.index.0 || from <= self.snap_index() {
            return Err("invalid");
        }
        let keep = (from - self.base.index.0 - 1) as usize;
        self.entries.truncate(keep);
        Ok(())
    }

    fn purge(&mut self, upto: u64) -> Outcome {
        if upto <= self.base.index.0 {
            return Ok(());
        }
        let Some(snap) = self
            .snapshot
            .as_ref()
            .filter(|s| s.last_included.index.0 >= upto)
        else {
            return Err("invalid");
        };
        if upto <= self.last().index.0 {
            let k = (upto - self.base.index.0) as usize;
            self.base = self.entries[k - 1].position;
            self.entries.drain(..k);
        } else {
            self.base = snap.last_included;
            self.entries.clear();
        }
        Ok(())
    }

    fn save_snapshot(&mut self, s: Snapshot) -> Outcome {
        if s.last_included.index < self.base.index {
            return Err("invalid");
        }
        self.snapshot = Some(s);
        Ok(())
    }

    fn install(&mut self, s: Snapshot) -> Outcome {
        let at = s.last_included;
        let keep = at.index >= self.base.index && self.position(at.index.0) == Some(at);
        if keep {
            let k = (at.index.0 - self.base.index.0) as usize;
            self.entries.drain(..k);
        } else {
            self.entries.clear();
        }
        self.base = at;
        self.snapshot = Some(s);
        Ok(())
    }

    fn load(&self) -> StoredState {
        let after = self.snap_index();
        StoredState {
            hard_state: self.hard_state.clone(),
            snapshot: self.snapshot,
            entries: self
                .entries
                .iter()
                .filter(|e| e.index().0 > after)
                .cloned()
                .collect(),
        }
    }

    fn read(&self, from: u64, to: u64) -> Result<Vec<WalEntry>, &'static str> {
        if from >= to {
            return Ok(Vec::new());
        }
        if from <= self.base.index.0 {
            return Err("invalid");
        }
        Ok(self
            .entries
            .iter()
            .filter(|e| (from..to).contains(&e.index().0))
            .cloned()
            .collect())
    }
}

/// An operation, with parameters read relative to the model's state.
#[derive(Clone, Debug)]
enum Op {
    Append { n: u8, bump: bool, size: u8 },
    AppendGap,
    Truncate { back: u8 },
    SaveSnapshot { back: u8 },
    Purge { back: i8 },
    Install { kind: u8, back: u8 },
    HardState { term: u8 },
    Read { back: u8, len: u8 },
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1u8..6, prop::bool::weighted(0.2), 0u8..80).prop_map(|(n, bump, size)| Op::Append { n, bump, size }),
        1 => Just(Op::AppendGap),
        2 => (0u8..10).prop_map(|back| Op::Truncate { back }),
        2 => (0u8..10).prop_map(|back| Op::SaveSnapshot { back }),
        2 => (-3i8..4).prop_map(|back| Op::Purge { back }),
        1 => (0u8..3, 0u8..6).prop_map(|(kind, back)| Op::Install { kind, back }),
        1 => (0u8..50).prop_map(|term| Op::HardState { term }),
        2 => (0u8..12, 0u8..8).prop_map(|(back, len)| Op::Read { back, len }),
        2 => Just(Op::Reopen),
    ]
}

/// Writes the same snapshot bytes into both stores (finished, not saved).
fn both_write(w: &Wal, mem: &MemLogStore, at: Position, data: &[u8]) -> Snapshot {
    use std::io::Write;
    let mut snaps = [
        w.snapshot_writer(at).unwrap(),
        mem.snapshot_writer(at).unwrap(),
    ]
    .into_iter()
    .map(|mut writer| {
        writer.write_all(data).unwrap();
        writer.finish().unwrap()
    });
    let (a, b) = (snaps.next().unwrap(), snaps.next().unwrap());
    assert_eq!(a, b);
    a
}

fn kind<T>(r: &Result<T, StorageError>) -> Result<(), &'static str> {
    match r {
        Ok(_) => Ok(()),
        Err(StorageError::Invalid(_)) => Err("invalid"),
        Err(e) => panic!("unexpected storage error: {e}"),
    }
}

/// Tiny segments. With `sync`, segments are also preallocated (zero tails).
fn cfg_with(sync: bool) -> WalConfig {
    WalConfig {
        segment_size: 300,
        sync,
        ..WalConfig::default()
    }
}

fn cfg() -> WalConfig {
    cfg_with(false)
}

fn run_ops(ops: &[Op], sync: bool) {
    let cfg = || cfg_with(sync);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("wal");
    let mut wal = Some(Wal::open(&dir, cfg()).unwrap());
    let mem = MemLogStore::new();
    let mut model = Model::default();
    let mut max_term = 1u64;
    block_on(async {
        for (step, op) in ops.iter().enumerate() {
            let w = wal.as_ref().unwrap();
            let last = model.last();
            let (got, oracle, want): (Outcome, Outcome, Outcome) = match op {
                Op::Append { n, bump, size } => {
                    if *bump {
                        max_term += 1;
                    }
                    let t = if *bump {
                        term(max_term)
                    } else {
                        last.term.max(term(1))
                    };
                    let batch: Vec<WalEntry> = (1..=u64::from(*n))
                        .map(|k| {
                            let i = last.index.0 + k;
                            WalEntry::new(
                                Position::new(t, LogIndex(i)),
                                Payload::Command(Command(vec![i as u8; usize::from(*size)])),
                            )
                        })
                        .collect();
                    (
                        kind(&w.append(batch.clone()).await),
                        kind(&mem.append(batch.clone()).await),
                        model.append(&batch),
                    )
                }
                Op::AppendGap => {
                    let e = WalEntry::noop(Position::new(last.term, LogIndex(last.index.0 + 2)));
                    (
                        kind(&w.append(vec![e.clone()]).await),
                        kind(&mem.append(vec![e.clone()]).await),
                        model.append(&[e]),
                    )
                }
                Op::Truncate { back } => {
                    let from = LogIndex((last.index.0 + 1).saturating_sub(u64::from(*back)).max(1));
                    (
                        kind(&w.truncate_suffix(from).await),
                        kind(&mem.truncate_suffix(from).await),
                        model.truncate(from.0),
                    )
                }
                Op::SaveSnapshot { back } => {
                    let index = last
                        .index
                        .0
                        .saturating_sub(u64::from(*back))
                        .max(model.base.index.0);
                    let at = model.position(index).unwrap();
                    let data = format!("snap {at} at step {step}").into_bytes();
                    let s = both_write(w, &mem, at, &data);
                    (
                        kind(&w.save_snapshot(s).await),
                        kind(&mem.save_snapshot(s).await),
                        model.save_snapshot(s),
                    )
                }
                Op::Purge { back } => {
                    let upto = (model.snap_index() as i64 - i64::from(*back)).max(0) as u64;
                    (
                        kind(&w.purge_prefix(LogIndex(upto)).await),
                        kind(&mem.purge_prefix(LogIndex(upto)).await),
                        model.purge(upto),
                    )
                }
                Op::Install { kind: k, back } => {
                    let at = match k {
                        // A position the log holds: the suffix after it stays.
                        0 => {
                            let index = last
                                .index
                                .0
                                .saturating_sub(u64::from(*back))
                                .max(model.base.index.0);
                            model.position(index).unwrap()
                        }
                        // The same index in a newer term: the log goes.
                        1 => {
                            max_term += 1;
                            let index = last.index.0.saturating_sub(u64::from(*back)).max(1);
                            Position::new(term(max_term), LogIndex(index))
                        }
                        // Past the end of the log.
                        _ => Position::new(
                            last.term.max(term(1)),
                            LogIndex(last.index.0 + 1 + u64::from(*back)),
                        ),
                    };
                    let data = format!("installed {at} at step {step}").into_bytes();
                    let s = both_write(w, &mem, at, &data);
                    (
                        kind(&w.install_snapshot(s).await),
                        kind(&mem.install_snapshot(s).await),
                        model.install(s),
                    )
                }
                Op::HardState { term: t } => {
                    let mut hs = HardState::bootstrap();
                    hs.current_term = term(u64::from(*t));
                    hs.voted_for = Some(NodeId(u64::from(*t) % 3));
                    hs.raise_floor(NodeId(2), last);
                    model.hard_state = Some(hs.clone());
                    (
                        kind(&w.save_hard_state(hs.clone()).await),
                        kind(&mem.save_hard_state(hs).await),
                        Ok(()),
                    )
                }
                Op::Read { back, len } => {
                    let from = (last.index.0 + 1).saturating_sub(u64::from(*back));
                    let to = from + u64::from(*len);
                    let got = w.read(LogIndex(from), LogIndex(to), usize::MAX).await;
                    let want = model.read(from, to);
                    match (&got, &want) {
                        (Ok(g), Ok(m)) => assert_eq!(g, m, "step {step}: read [{from}, {to})"),
                        (Err(StorageError::Invalid(_)), Err(_)) => {}
                        _ => {
                            panic!("step {step}: read [{from}, {to}): got {got:?}, model {want:?}")
                        }
                    }
                    (Ok(()), Ok(()), Ok(()))
                }
                Op::Reopen => {
                    drop(wal.take());
                    wal = Some(
                        Wal::open(&dir, cfg())
                            .unwrap_or_else(|e| panic!("step {step}: reopen: {e}")),
                    );
                    (Ok(()), Ok(()), Ok(()))
                }
            };
            assert_eq!(
                oracle, want,
                "step {step}: {op:?}: the model disagrees with MemLogStore"
            );
            assert_eq!(got, want, "step {step}: {op:?}: outcome");
            let w = wal.as_ref().unwrap();
            assert_eq!(
                w.last_position().await.unwrap(),
                model.last(),
                "step {step}: {op:?}: last_position"
            );
            assert_eq!(
                w.load().await.unwrap(),
                model.load(),
                "step {step}: {op:?}: load"
            );
        }
        // And a final reopen reads the same.
        drop(wal.take());
        let w = Wal::open(&dir, cfg()).unwrap();
        assert_eq!(
            w.load().await.unwrap(),
            model.load(),
            "after the final reopen"
        );
        assert_eq!(
            w.load().await.unwrap(),
            mem.state(),
            "the same as MemLogStore"
        );
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn ops_match_the_model(ops in prop::collection::vec(op(), 1..40), sync in any::<bool>()) {
        run_ops(&ops, sync);
    }

    #[test]
    fn decoder_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        let _ = decode_record(&bytes);
        let _ = SegmentHeader::decode(&bytes);
    }

    #[test]
    fn decoder_never_panics_on_damaged_records(
        size in 0usize..200,
        flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 0..4),
        cut in any::<prop::sample::Index>(),
    ) {
        let e = WalEntry::new(
            Position::new(term(3), LogIndex(9)),
            Payload::Command(Command(vec![7; size])),
        );
        let mut buf = Vec::new();
        encode_record(&e, &mut buf).unwrap();
        let n = buf.len();
        for (at, x) in &flips {
            buf[at.index(n)] ^= x;
        }
        let cut = cut.index(n + 1);
        if let ha_wal::format::RecordDecode::Record { entry, .. } = decode_record(&buf[..cut]) {
            // Only the intact record decodes.
            prop_assert!(flips.is_empty() && cut == n);
            prop_assert_eq!(entry, e);
        }
    }

    #[test]
    fn open_never_panics_on_arbitrary_segment_bytes(
        valid_header in any::<bool>(),
        records in 0u64..4,
        tail in prop::collection::vec(any::<u8>(), 0..300),
        meta in prop::option::of(prop::collection::vec(any::<u8>(), 0..64)),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let mut bytes = Vec::new();
        if valid_header {
            bytes.extend_from_slice(&SegmentHeader { seq: 0, first_index: 1 }.encode());
            for i in 1..=records {
                let e = WalEntry::new(
                    Position::new(term(1), LogIndex(i)),
                    Payload::Command(Command(vec![i as u8; 10])),
                );
                encode_record(&e, &mut bytes).unwrap();
            }
        }
        bytes.extend_from_slice(&tail);
        fs::write(dir.join(segment_file_name(0)), &bytes).unwrap();
        if let Some(meta) = &meta {
            for name in ["log_meta", "hard_state", "snapshot"] {
                fs::write(dir.join(name), meta).unwrap();
            }
        }
        check_open(dir);
    }
}

/// Opens and loads; any outcome but a panic is fine.
fn check_open(dir: &Path) {
    if let Ok(wal) = Wal::open(dir, cfg()) {
        let _ = block_on(wal.load());
        let _ = block_on(wal.last_position());
    }
}
