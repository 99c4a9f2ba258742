//! Crash safety of recovery: a torn tail is cut back to the durable prefix; any
//! other damage refuses to open with an error naming the segment and byte offset.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::{Path, PathBuf};

use ha_core::log_store::LogStore;
use ha_core::types::{Command, LogIndex, NodeId, Payload, Position, Term, WalEntry};
use ha_core::StorageError;
use ha_wal::format::{decode_record, RecordDecode, SegmentHeader, SEGMENT_HEADER_LEN};
use ha_wal::{Wal, WalConfig};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(f)
}

fn entry(i: u64) -> WalEntry {
    let term = Term {
        number: 1 + i / 7,
        node: NodeId(1),
    };
    let body: Vec<u8> = (0..(10 + (i * 13) % 50)).map(|k| (i + k) as u8).collect();
    WalEntry::new(
        Position::new(term, LogIndex(i)),
        Payload::Command(Command(body)),
    )
}

fn cfg() -> WalConfig {
    // Small segments: the log spans several of them.
    WalConfig::default().with_segment_size(400)
}

/// Writes entries 1..=n in a few appends and closes the log.
fn write_log(dir: &Path, n: u64) -> Vec<WalEntry> {
    let all: Vec<WalEntry> = (1..=n).map(entry).collect();
    let wal = Wal::open(dir, cfg()).unwrap();
    block_on(async {
        for chunk in all.chunks(3) {
            wal.append(chunk.to_vec()).await.unwrap();
        }
    });
    assert!(wal.segment_count() >= 3, "the test wants several segments");
    drop(wal);
    all
}

/// The segment files, in order.
fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    v.sort();
    v
}

/// The `[start, end)` byte ranges of the records in a segment file.
fn record_ranges(bytes: &[u8]) -> Vec<(usize, usize)> {
    SegmentHeader::decode(bytes).unwrap();
    let mut out = Vec::new();
    let mut off = SEGMENT_HEADER_LEN;
    while let RecordDecode::Record { len, .. } = decode_record(&bytes[off..]) {
        out.push((off, off + len));
        off += len;
    }
    out
}

fn load_entries(dir: &Path) -> Result<Vec<WalEntry>, StorageError> {
    let wal = Wal::open(dir, cfg())?;
    let state = block_on(wal.load())?;
    let last = block_on(wal.last_position())?;
    let want_last = state
        .entries
        .last()
        .map(|e| e.position)
        .unwrap_or(Position::ZERO);
    assert_eq!(last, want_last, "last_position agrees with load");
    Ok(state.entries)
}

#[test]
fn torn_last_record_is_cut_at_every_byte_offset() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let all = write_log(dir, 40);
    let last_seg = segments(dir).pop().unwrap();
    let pristine = fs::read(&last_seg).unwrap();
    let ranges = record_ranges(&pristine);
    let (start, end) = *ranges.last().unwrap();
    let durable = &all[..all.len() - 1];

    for cut in start..end {
        // The file ends inside the last record (a torn append without preallocation).
        fs::write(&last_seg, &pristine[..cut]).unwrap();
        let got = load_entries(dir).unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
        assert_eq!(got, durable, "cut at {cut}");
        assert_eq!(
            fs::metadata(&last_seg).unwrap().len(),
            start as u64,
            "torn tail truncated"
        );

        // The rest of the record reads as zeros (a preallocated file whose last pages
        // were not written).
        let mut zeroed = pristine.clone();
        zeroed[cut..].fill(0);
        fs::write(&last_seg, &zeroed).unwrap();
        assert_eq!(load_entries(dir).unwrap(), durable, "zeros from {cut}");

        // Or garbage (a partly written page), with nothing valid after it.
        let mut garbage = pristine[..end].to_vec();
        for (k, b) in garbage[cut..].iter_mut().enumerate() {
            *b = b.wrapping_add(1 + k as u8);
        }
        fs::write(&last_seg, &garbage).unwrap();
        assert_eq!(load_entries(dir).unwrap(), durable, "garbage from {cut}");
    }

    // The whole record is there: nothing is lost.
    fs::write(&last_seg, &pristine).unwrap();
    assert_eq!(load_entries(dir).unwrap(), all);

    // After a cut, the log goes on from the durable prefix.
    fs::write(&last_seg, &pristine[..start + 5]).unwrap();
    let wal = Wal::open(dir, cfg()).unwrap();
    block_on(wal.append(vec![all.last().unwrap().clone()])).unwrap();
    drop(wal);
    assert_eq!(load_entries(dir).unwrap(), all);
}

#[test]
fn damage_before_the_tail_is_refused_with_segment_and_offset() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let all = write_log(dir, 40);
    let segs = segments(dir);
    let pristine: Vec<Vec<u8>> = segs.iter().map(|p| fs::read(p).unwrap()).collect();
    // Every record except the very last one of the last segment.
    let mut targets = Vec::new();
    for (s, bytes) in pristine.iter().enumerate() {
        let ranges = record_ranges(bytes);
        let n = ranges.len();
        for (r, range) in ranges.into_iter().enumerate() {
            if s + 1 == pristine.len() && r + 1 == n {
                continue;
            }
            targets.push((s, range));
        }
    }
    assert_eq!(targets.len(), all.len() - 1);

    let mut rng = SmallRng::seed_from_u64(0x5eed_0003);
    for trial in 0..300 {
        let (s, (start, end)) = targets[rng.random_range(0..targets.len())];
        let mut bytes = pristine[s].clone();
        let flips = rng.random_range(1..=3);
        for _ in 0..flips {
            let at = rng.random_range(start..end);
            bytes[at] ^= rng.random_range(1..=255u8);
        }
        fs::write(&segs[s], &bytes).unwrap();
        match Wal::open(dir, cfg()) {
            Ok(wal) => {
                let state = block_on(wal.load());
                panic!(
                    "trial {trial}: damage in {} at {start}..{end} was accepted: {:?} entries",
                    segs[s].display(),
                    state.map(|s| s.entries.len())
                );
            }
            Err(StorageError::Corrupt(msg)) => {
                let name = segs[s].file_name().unwrap().to_str().unwrap();
                assert!(
                    msg.contains(name),
                    "trial {trial}: {msg:?} names the segment {name}"
                );
                assert!(
                    msg.contains(&format!("byte offset {start}:")),
                    "trial {trial}: {msg:?} names the offset {start}"
                );
            }
            Err(e) => panic!("trial {trial}: expected a corruption error, got {e}"),
        }
        fs::write(&segs[s], &pristine[s]).unwrap();
    }
    assert_eq!(load_entries(dir).unwrap(), all, "the restored log opens");
}

#[test]
fn damaged_headers_and_gaps_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let all = write_log(dir, 40);
    let segs = segments(dir);

    // A bad segment header, in the middle or at the end.
    for s in [1, segs.len() - 1] {
        let pristine = fs::read(&segs[s]).unwrap();
        for at in [0, 9, 20, 30, 39] {
            let mut bytes = pristine.clone();
            bytes[at] ^= 0x40;
            fs::write(&segs[s], &bytes).unwrap();
            let err = Wal::open(dir, cfg()).unwrap_err().to_string();
            let name = segs[s].file_name().unwrap().to_str().unwrap();
            assert!(err.contains(name) && err.contains("byte offset 0"), "{err}");
        }
        fs::write(&segs[s], &pristine).unwrap();
    }

    // A missing middle segment is a gap.
    let middle = fs::read(&segs[1]).unwrap();
    fs::remove_file(&segs[1]).unwrap();
    let err = Wal::open(dir, cfg()).unwrap_err().to_string();
    assert!(err.contains("gap"), "{err}");
    let name = segs[2].file_name().unwrap().to_str().unwrap();
    assert!(err.contains(name), "{err}");
    fs::write(&segs[1], &middle).unwrap();

    // A middle segment cut short (it was complete before the next one was made).
    let (start, _) = *record_ranges(&middle).last().unwrap();
    fs::write(&segs[1], &middle[..start + 3]).unwrap();
    let err = Wal::open(dir, cfg()).unwrap_err().to_string();
    assert!(
        err.contains(segs[1].file_name().unwrap().to_str().unwrap()),
        "{err}"
    );
    fs::write(&segs[1], &middle).unwrap();

    // A damaged small file names itself.
    let wal = Wal::open(dir, cfg()).unwrap();
    let mut hs = ha_core::types::HardState::bootstrap();
    hs.current_term = Term {
        number: 9,
        node: NodeId(2),
    };
    block_on(wal.save_hard_state(hs)).unwrap();
    drop(wal);
    let path = dir.join("hard_state");
    let pristine = fs::read(&path).unwrap();
    let mut bytes = pristine.clone();
    let n = bytes.len();
    bytes[n - 1] ^= 1;
    fs::write(&path, &bytes).unwrap();
    let err = Wal::open(dir, cfg()).unwrap_err().to_string();
    assert!(err.contains("hard_state"), "{err}");
    fs::write(&path, &pristine).unwrap();

    assert_eq!(load_entries(dir).unwrap(), all);
}

/// One fdatasync covers a whole write group, and a crash during it may persist the
/// group's sectors in any order: a hole inside the last group, with valid records of
/// the same group after it, is still a torn tail (none of the group was
/// acknowledged). A hole followed by a later group is corruption.
#[test]
fn a_hole_in_the_last_write_group_is_a_torn_tail_but_not_before_a_later_group() {
    let big = WalConfig::default().with_segment_size(1 << 20);
    let write = |dir: &Path| {
        let wal = Wal::open(dir, big.clone()).unwrap();
        block_on(async {
            wal.append((1..=2).map(entry).collect()).await.unwrap(); // group A
            wal.append((3..=5).map(entry).collect()).await.unwrap(); // group B, last
        });
    };
    let zero_record = |dir: &Path, k: usize| {
        let seg = segments(dir).pop().unwrap();
        let mut bytes = fs::read(&seg).unwrap();
        let (start, end) = record_ranges(&bytes)[k];
        bytes[start..end].iter_mut().for_each(|b| *b = 0);
        fs::write(&seg, bytes).unwrap();
    };

    // A hole at entry 3 (first of the last group), entries 4-5 intact.
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path());
    zero_record(tmp.path(), 2);
    let wal = Wal::open(tmp.path(), big.clone()).expect("a torn last group opens");
    let state = block_on(wal.load()).unwrap();
    assert_eq!(state.entries, (1..=2).map(entry).collect::<Vec<_>>());
    drop(wal);

    // A hole at entry 2 (group A), with group B after it: refused, naming the offset.
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path());
    zero_record(tmp.path(), 1);
    match Wal::open(tmp.path(), big) {
        Err(StorageError::Corrupt(msg)) => assert!(msg.contains("byte offset"), "{msg}"),
        other => panic!("expected corruption, got {:?}", other.map(|_| ())),
    }
}
