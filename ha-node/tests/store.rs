//! The redb state machine: compare-and-set, listing, restart at its own applied
//! index, and snapshots.

use ha_core::{Command, LogIndex, NodeId, Position, StateCapture, StateMachine, Term};
use ha_node::kv::{Item, KvAnswer, KvCommand, KvOutput, KvQuery};
use ha_node::store::KvStore;

fn at(i: u64) -> Position {
    Position {
        term: Term {
            number: 1,
            node: NodeId(1),
        },
        index: LogIndex(i),
    }
}

fn put(key: &str, value: &str, if_mod_index: Option<u64>) -> Command {
    Command(
        KvCommand::Put {
            key: key.into(),
            value: value.into(),
            if_mod_index,
        }
        .encode(),
    )
}

fn del(key: &str, if_mod_index: Option<u64>) -> Command {
    Command(
        KvCommand::Delete {
            key: key.into(),
            if_mod_index,
        }
        .encode(),
    )
}

fn get(s: &KvStore, key: &str) -> Option<Item> {
    let q = KvQuery::Get { key: key.into() }.encode();
    match KvAnswer::decode(&s.query(&q)).expect("answer") {
        KvAnswer::Value(v) => v,
        other => panic!("{other:?}"),
    }
}

fn list(s: &KvStore, prefix: &str, after: Option<&str>, limit: u32) -> (Vec<String>, bool) {
    let q = KvQuery::List {
        prefix: prefix.into(),
        start_after: after.map(|a| serde_bytes::ByteBuf::from(a.as_bytes().to_vec())),
        limit,
    }
    .encode();
    match KvAnswer::decode(&s.query(&q)).expect("answer") {
        KvAnswer::List { items, more } => (
            items
                .into_iter()
                .map(|i| String::from_utf8(i.key).expect("utf8"))
                .collect(),
            more,
        ),
        other => panic!("{other:?}"),
    }
}

fn out(bytes: Vec<u8>) -> KvOutput {
    KvOutput::decode(&bytes).expect("output")
}

#[test]
fn compare_and_set_checks_the_mod_index_of_the_last_write() {
    let dir = tempfile::tempdir().expect("dir");
    let mut s = KvStore::open(&dir.path().join("kv.redb")).expect("open");
    assert_eq!(
        out(s.apply(at(1), &put("a", "1", Some(0)))),
        KvOutput::Done { existed: false }
    );
    // The key exists now: "must not exist" fails, naming its mod_index.
    assert_eq!(
        out(s.apply(at(2), &put("a", "2", Some(0)))),
        KvOutput::Mismatch { current: 1 }
    );
    assert_eq!(
        out(s.apply(at(3), &put("a", "3", Some(1)))),
        KvOutput::Done { existed: true }
    );
    let item = get(&s, "a").expect("a");
    assert_eq!((item.value.as_slice(), item.mod_index), (&b"3"[..], 3));
    assert_eq!(
        out(s.apply(at(4), &del("a", Some(1)))),
        KvOutput::Mismatch { current: 3 }
    );
    assert_eq!(
        out(s.apply(at(5), &del("a", Some(3)))),
        KvOutput::Done { existed: true }
    );
    assert_eq!(get(&s, "a"), None);
    assert!(matches!(
        out(s.apply(at(6), &Command(vec![250, 1]))),
        KvOutput::Invalid(_)
    ));
    assert_eq!(s.applied_index(), LogIndex(6));
}

#[test]
fn a_listing_is_ordered_bounded_and_paginated_across_pending_and_committed_writes() {
    let dir = tempfile::tempdir().expect("dir");
    let mut s = KvStore::open(&dir.path().join("kv.redb")).expect("open");
    let mut i = 0;
    for k in ["p/c", "p/a", "q/x", "p/e", "p/b"] {
        i += 1;
        s.apply(at(i), &put(k, "v", None));
    }
    i += 1;
    s.apply(at(i), &del("p/c", None));
    let (page, more) = list(&s, "p/", None, 2);
    assert_eq!((page, more), (vec!["p/a".to_string(), "p/b".into()], true));
    let (page, more) = list(&s, "p/", Some("p/b"), 2);
    assert_eq!((page, more), (vec!["p/e".to_string()], false));
    // The same once the writer has committed everything.
    drop(s);
    let s = KvStore::open(&dir.path().join("kv.redb")).expect("reopen");
    assert_eq!(
        list(&s, "p/", None, 10),
        (vec!["p/a".to_string(), "p/b".into(), "p/e".into()], false)
    );
}

#[test]
fn a_reopened_store_resumes_from_its_own_applied_index() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("kv.redb");
    {
        let mut s = KvStore::open(&path).expect("open");
        s.apply(at(1), &put("a", "1", None));
        s.apply_noop(at(2));
        s.apply(at(3), &put("b", "2", None));
    }
    let s = KvStore::open(&path).expect("reopen");
    assert_eq!(s.applied_index(), LogIndex(3));
    assert_eq!(s.durable_index(), Some(LogIndex(3)));
    assert_eq!(get(&s, "b").map(|i| i.mod_index), Some(3));
}

#[test]
fn a_snapshot_restores_the_same_state_elsewhere_and_reset_empties_it() {
    let dir = tempfile::tempdir().expect("dir");
    let mut a = KvStore::open(&dir.path().join("a.redb")).expect("open");
    for i in 1..=50 {
        a.apply(at(i), &put(&format!("k{i:03}"), &i.to_string(), None));
    }
    a.apply(at(51), &del("k007", None));
    let mut data = Vec::new();
    a.capture().write_to(&mut data).expect("serialize");
    // Writes after the capture are not in it.
    a.apply(at(52), &put("late", "x", None));

    let mut b = KvStore::open(&dir.path().join("b.redb")).expect("open");
    b.apply(at(1), &put("stale", "x", None));
    b.restore(LogIndex(51), &mut &data[..]).expect("restore");
    assert_eq!(b.applied_index(), LogIndex(51));
    assert_eq!(get(&b, "stale"), None);
    assert_eq!(get(&b, "late"), None);
    assert_eq!(get(&b, "k007"), None);
    assert_eq!(get(&b, "k050").map(|i| i.mod_index), Some(50));
    assert_eq!(list(&b, "k", None, 1000).0.len(), 49);
    // A snapshot offered under another index is refused.
    assert!(b.restore(LogIndex(9), &mut &data[..]).is_err());
    // The restore is durable.
    drop(b);
    let mut b = KvStore::open(&dir.path().join("b.redb")).expect("reopen");
    assert_eq!(b.applied_index(), LogIndex(51));
    assert_eq!(list(&b, "k", None, 1000).0.len(), 49);

    // A stream cut short fails, and leaves a store a restart restores again
    // (applied index 0, below any snapshot), never a mix under the old index.
    assert!(b
        .restore(LogIndex(51), &mut &data[..data.len() - 3])
        .is_err());
    drop(b);
    let mut b = KvStore::open(&dir.path().join("b.redb")).expect("reopen");
    assert_eq!(b.applied_index(), LogIndex(0));

    b.reset();
    assert_eq!(b.applied_index(), LogIndex(0));
    assert_eq!(list(&b, "", None, 1000).0.len(), 0);
}
