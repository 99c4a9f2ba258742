//! Observability of real `ha-node` processes: `/metrics` scraped and parsed
//! (prometheus-parse, no regexes) before and after a SIGKILL failover, the
//! metric set compared with `docs/metrics.md` and the example Grafana
//! dashboard, the event history across a restart, and JSON logs line by line.
//! Every wait polls the API's published state, bounded.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use ha_node::client::Client;
use ha_node::config::TransportKind;
use ha_node::local::{LocalCluster, LocalOptions, WITNESS};
use prometheus_parse::{Scrape, Value};

const STEP: Duration = Duration::from_secs(30);

fn exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_ha-node"))
}

fn repo_file(rel: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn scrape(c: &Client, api: &str) -> Scrape {
    let r = c
        .request("GET", &format!("{api}/metrics"), None)
        .unwrap_or_else(|e| panic!("scrape {api}: {e}"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.header("content-type"),
        Some(ha_node::metrics::CONTENT_TYPE)
    );
    let text = r.text();
    assert!(
        text.trim_end().ends_with("# EOF"),
        "OpenMetrics ends with # EOF"
    );
    Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("exposition parses")
}

/// The value of the sample `name` whose labels include `labels`.
fn value(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    s.samples
        .iter()
        .find(|x| {
            x.metric == name
                && labels
                    .iter()
                    .all(|(k, v)| x.labels.get(k).is_some_and(|have| have == *v))
        })
        .and_then(|x| match x.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(v),
            _ => None,
        })
}

fn must(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    value(s, name, labels).unwrap_or_else(|| panic!("no sample {name}{labels:?}"))
}

/// `name`'s samples for `peer`, summed over both directions.
fn both_ways(s: &Scrape, name: &str, peer: &str) -> f64 {
    ["inbound", "outbound"]
        .iter()
        .map(|d| must(s, name, &[("peer", peer), ("direction", d)]))
        .sum()
}

/// The metric families a scrape documents (its HELP lines).
fn families(s: &Scrape) -> BTreeSet<String> {
    s.docs.keys().cloned().collect()
}

/// The metric names `docs/metrics.md` lists: the first `code` of each table
/// row.
fn documented() -> BTreeSet<String> {
    repo_file("../docs/metrics.md")
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .map(str::to_string)
        .collect()
}

/// The metric families an expression names: its identifiers that start like
/// ours, with the sample suffixes of counters and histograms taken off.
fn named_in(expr: &str) -> Vec<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|w| w.starts_with("ha_") || w.starts_with("process_"))
        .map(|w| {
            ["_bucket", "_count", "_sum", "_total"]
                .iter()
                .find_map(|suffix| w.strip_suffix(suffix))
                .unwrap_or(w)
                .to_string()
        })
        .collect()
}

/// Every `expr` in the dashboard JSON.
fn dashboard_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                    _ => dashboard_exprs(x, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| dashboard_exprs(x, out)),
        _ => {}
    }
}

#[test]
fn the_example_dashboard_uses_only_documented_metrics() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&repo_file("examples/grafana-dashboard.json")).expect("json");
    let mut exprs = Vec::new();
    dashboard_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() >= 8, "a dashboard of {} queries", exprs.len());
    let docs = documented();
    for e in &exprs {
        let names = named_in(e);
        assert!(!names.is_empty(), "{e} names no metric");
        for n in names {
            assert!(
                docs.contains(&n),
                "the dashboard uses {n}, which docs/metrics.md does not list"
            );
        }
    }
}

#[test]
fn metrics_events_and_logs_of_a_cluster_through_a_failover() {
    let mut c = LocalCluster::create(
        exe(),
        &LocalOptions {
            transport: TransportKind::Quic,
            ..LocalOptions::default()
        },
    )
    .expect("cluster");
    c.start_all().expect("start");
    let (first, s) = c.wait_for_primary(STEP).expect("primary");
    let p = first.node_id;
    let (pa, sa, wa) = (
        c.api(p).to_string(),
        c.api(s).to_string(),
        c.api(WITNESS).to_string(),
    );
    let anon = Client::new(Duration::from_secs(5), None);
    for k in 0..20 {
        let r = anon
            .request("PUT", &format!("{pa}/v1/kv/m{k}"), Some(b"v"))
            .expect("put");
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let r = anon
        .request("PUT", &format!("{sa}/v1/kv/refused"), Some(b"v"))
        .expect("put");
    assert_eq!(r.status, 503);
    let want = c.status(p).expect("status").commit_index;
    c.wait_for(&[s], STEP, "the standby to hold every write", |x| {
        x.last_index >= want
    })
    .expect("caught up");
    let sid = s;
    let matched = c
        .wait_for(&[p], STEP, "the primary to see the standby's match", |x| {
            x.peers
                .iter()
                .any(|q| q.id == sid && q.match_index == Some(x.last_index))
        })
        .expect("matched");

    // Before: the primary's view.
    let before_p = scrape(&anon, &pa);
    let before_s = scrape(&anon, &sa);
    let before_w = scrape(&anon, &wa);
    let term0 = first.term as f64;
    assert_eq!(must(&before_p, "ha_term", &[]), term0);
    assert_eq!(must(&before_p, "ha_is_primary", &[]), 1.0);
    assert_eq!(must(&before_p, "ha_role", &[("role", "primary")]), 1.0);
    assert_eq!(must(&before_p, "ha_role", &[("role", "standby")]), 0.0);
    assert_eq!(must(&before_s, "ha_role", &[("role", "standby")]), 1.0);
    assert_eq!(must(&before_w, "ha_role", &[("role", "witness")]), 1.0);
    assert!(must(&before_p, "ha_elections_won_total", &[]) >= 1.0);
    assert!(must(&before_p, "ha_client_writes_total", &[("outcome", "acked")]) >= 20.0);
    assert_eq!(
        must(
            &before_s,
            "ha_client_writes_total",
            &[("outcome", "not_primary")]
        ),
        1.0
    );
    assert!(must(&before_s, "ha_leader_changes_total", &[]) >= 1.0);
    assert!(must(&before_p, "ha_commit_index", &[]) >= want as f64);
    assert!(must(&before_p, "ha_wal_fsyncs_total", &[]) >= 1.0);
    assert!(must(&before_p, "process_resident_memory_bytes", &[]) > 0.0);
    let ps = p.to_string();
    let ss = s.to_string();
    // Lag is the primary's last index less the standby's match: nothing once
    // the standby holds it all (unless the primary appended since).
    let lag = must(&before_p, "ha_peer_lag_entries", &[("peer", &ss)]);
    let last = must(&before_p, "ha_last_index", &[]);
    let held = must(&before_p, "ha_peer_match_index", &[("peer", &ss)]);
    assert!(held >= matched.last_index as f64, "match {held} went back");
    assert_eq!(lag, last - held, "lag {lag} at last {last}");
    if last == matched.last_index as f64 {
        assert_eq!(lag, 0.0);
    }
    assert_eq!(must(&before_p, "ha_peer_healthy", &[("peer", &ss)]), 1.0);
    // The pair talks over an open QUIC connection, counted on both sides.
    assert!(both_ways(&before_p, "ha_peer_connections", &ss) >= 1.0);
    assert!(both_ways(&before_s, "ha_peer_connections_opened_total", &ps) >= 1.0);
    // Every metric exported is documented, and every documented one exported
    // by some member.
    let exported: BTreeSet<String> = families(&before_p)
        .union(&families(&before_s))
        .cloned()
        .collect::<BTreeSet<_>>()
        .union(&families(&before_w))
        .cloned()
        .collect();
    assert_eq!(
        exported,
        documented(),
        "docs/metrics.md must list exactly the metrics the node exports"
    );

    // SIGKILL of the primary: the standby takes over.
    c.kill(p);
    let after = c
        .wait_for(&[s], STEP, "the standby to take over", |x| x.writable)
        .expect("failover");
    for k in 0..5 {
        let r = anon
            .request("PUT", &format!("{sa}/v1/kv/after{k}"), Some(b"v"))
            .expect("put");
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let after_s = scrape(&anon, &sa);
    assert_eq!(must(&after_s, "ha_term", &[]), after.term as f64);
    assert!(after.term > first.term);
    assert_eq!(must(&after_s, "ha_is_primary", &[]), 1.0);
    assert!(
        must(&after_s, "ha_elections_won_total", &[])
            > must(&before_s, "ha_elections_won_total", &[])
    );
    assert!(
        must(&after_s, "ha_elections_started_total", &[("round", "vote")])
            > must(
                &before_s,
                "ha_elections_started_total",
                &[("round", "vote")]
            )
    );
    assert!(
        must(&after_s, "ha_leader_changes_total", &[])
            > must(&before_s, "ha_leader_changes_total", &[])
    );
    // The dead old primary lags behind the writes made since.
    assert!(must(&after_s, "ha_peer_lag_entries", &[("peer", &ps)]) >= 5.0);
    assert!(must(&after_s, "ha_peer_lag_bytes", &[("peer", &ps)]) > 0.0);
    assert_eq!(must(&after_s, "ha_peer_healthy", &[("peer", &ps)]), 0.0);
    let after_w = scrape(&anon, &wa);
    assert!(
        must(
            &after_w,
            "ha_votes_cast_total",
            &[("round", "vote"), ("granted", "true")]
        ) > must(
            &before_w,
            "ha_votes_cast_total",
            &[("round", "vote"), ("granted", "true")]
        )
    );

    // The new primary's history tells the election with its votes.
    let ev = anon
        .request("GET", &format!("{sa}/v1/events?since=0"), None)
        .expect("events");
    assert_eq!(ev.status, 200, "{}", ev.text());
    let ev = ev.json().expect("json");
    let events = ev["events"].as_array().expect("events").clone();
    let won = events
        .iter()
        .find(|e| e["kind"] == "election_won" && e["term"]["number"] == after.term)
        .unwrap_or_else(|| panic!("no election_won in {events:?}"));
    assert_eq!(won["votes"].as_array().map(Vec::len), Some(2), "{won}");
    assert!(events.iter().any(|e| e["kind"] == "node_started"));
    let seqs: Vec<u64> = events.iter().filter_map(|e| e["seq"].as_u64()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order: {seqs:?}");

    // The old primary comes back: its history survived the SIGKILL.
    c.start(p).expect("restart");
    let want = c.status(s).expect("status").commit_index;
    c.wait_for(&[p], STEP, "the old primary to rejoin", |x| {
        x.role == "standby" && x.applied_index >= want
    })
    .expect("rejoin");
    let ev = anon
        .request("GET", &format!("{pa}/v1/events?since=0"), None)
        .expect("events")
        .json()
        .expect("json");
    let events = ev["events"].as_array().expect("events").clone();
    assert_eq!(
        events
            .iter()
            .filter(|e| e["kind"] == "node_started")
            .count(),
        2,
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "election_won" && e["term"]["number"] == first.term),
        "the election it won before the kill: {events:?}"
    );
    // Its lag on the primary closes once it rejoined.
    let pid = p;
    let at = c
        .wait_for(
            &[s],
            STEP,
            "the primary to see the rejoined standby's match",
            |x| {
                x.peers
                    .iter()
                    .any(|q| q.id == pid && q.match_index == Some(x.last_index))
            },
        )
        .expect("matched");
    let now = scrape(&anon, &sa);
    assert!(
        both_ways(&now, "ha_peer_connections_opened_total", &ps)
            > both_ways(&after_s, "ha_peer_connections_opened_total", &ps),
        "the rejoined node's connection is counted"
    );
    if must(&now, "ha_last_index", &[]) == at.last_index as f64 {
        assert_eq!(must(&now, "ha_peer_lag_entries", &[("peer", &ps)]), 0.0);
        assert_eq!(must(&now, "ha_peer_lag_bytes", &[("peer", &ps)]), 0.0);
    }

    // `ha-node events` prints the history as lines; `--follow` then prints
    // each new event as it happens.
    let out = Command::new(exe())
        .args(["events", "--api", &sa])
        .output()
        .expect("ha-node events");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let won = format!("term={}", after.term);
    assert!(
        text.lines()
            .any(|l| l.contains("election_won") && l.contains(&won)),
        "{text}"
    );
    let newest = anon
        .request("GET", &format!("{sa}/v1/events?since=0"), None)
        .expect("events")
        .json()
        .expect("json")["next_since"]
        .as_u64()
        .expect("next_since");
    let mut follow = Command::new(exe())
        .args(["events", "--follow", "--json", "--api", &sa])
        .args(["--since", &newest.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("ha-node events --follow");
    let stdout = follow.stdout.take().expect("stdout");
    let (tx, lines) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let r = c
        .client()
        .request("POST", &format!("{sa}/v1/admin/pause-failover"), None)
        .expect("pause");
    assert_eq!(r.status, 200, "{}", r.text());
    let mut seen = Vec::new();
    let asked = loop {
        let line = lines
            .recv_timeout(STEP)
            .unwrap_or_else(|e| panic!("--follow printed no operator request ({e}): {seen:?}"));
        let v: serde_json::Value = serde_json::from_str(&line).expect("--json lines are JSON");
        assert!(v["seq"].as_u64().is_some_and(|n| n > newest), "{line}");
        if v["kind"] == "operator_request" {
            break v;
        }
        seen.push(line);
    };
    assert_eq!(asked["request"], "pause-failover", "{asked}");
    let _ = follow.kill();
    let _ = follow.wait();
    reader.join().expect("reader");

    // JSON logs: every line of every node is a JSON object, and the protocol's
    // events carry their kind.
    for id in [1, 2, WITNESS] {
        c.terminate(id, Duration::from_secs(15));
        let log = std::fs::read_to_string(c.log(id)).expect("log");
        let mut events = 0;
        for line in log.lines().filter(|l| !l.trim().is_empty()) {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("node {id}: not JSON ({e}): {line}"));
            if v["fields"]["event"].is_string() {
                events += 1;
            }
        }
        assert!(events > 0, "node {id} logged no structured event");
    }
    c.teardown(false);
}
