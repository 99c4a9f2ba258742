//! `ha-node demo`: a real three-process cluster on loopback, a SIGKILL of the
//! primary, the measured failover, a rejoin and a switchover, with every
//! acknowledged write checked.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::cli::encode_key;
use crate::config::TransportKind;
use crate::local::{CleanupSlot, LocalCluster, LocalOptions, WITNESS};

/// What the demo is asked to do.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// The peer transport.
    pub transport: TransportKind,
    /// Keys written before the kill.
    pub keys: usize,
    /// Keep the directory (configs, data, logs) instead of removing it.
    pub keep: bool,
}

/// How long any one step may take.
const STEP: Duration = Duration::from_secs(30);

struct Timeline {
    start: Instant,
    events: Vec<(Duration, String)>,
}

impl Timeline {
    fn mark(&mut self, what: impl Into<String>) {
        let what = what.into();
        let at = self.start.elapsed();
        println!("[{:>8.3}s] {what}", at.as_secs_f64());
        self.events.push((at, what));
    }
}

/// Runs the demo; `Err` names the failed check. `cleanup` is filled for a
/// Ctrl-C handler ([`crate::local::clean_up`]).
pub fn run(exe: &Path, opts: &DemoOptions, cleanup: &CleanupSlot) -> Result<(), String> {
    let mut c = LocalCluster::create(
        exe,
        &LocalOptions {
            transport: opts.transport,
            ..LocalOptions::default()
        },
    )?;
    if let Ok(mut slot) = cleanup.lock() {
        *slot = Some((c.pids(), c.dir().to_path_buf()));
    }
    let result = steps(&mut c, opts);
    if result.is_err() {
        for id in crate::local::MEMBERS {
            eprintln!(
                "--- last lines of node {id}'s log ({}):",
                c.log(id).display()
            );
            if let Ok(text) = std::fs::read_to_string(c.log(id)) {
                let lines: Vec<&str> = text.lines().collect();
                for l in &lines[lines.len().saturating_sub(8)..] {
                    eprintln!("{l}");
                }
            }
        }
    }
    if let Ok(mut slot) = cleanup.lock() {
        *slot = None;
    }
    if let Some(kept) = c.teardown(opts.keep) {
        println!("kept {}", kept.display());
    }
    result
}

fn put(
    c: &LocalCluster,
    api: &str,
    key: &str,
    value: &str,
) -> Result<(u16, serde_json::Value), String> {
    let r = c.client().request(
        "PUT",
        &format!("{api}/v1/kv/{}", encode_key(key)),
        Some(value.as_bytes()),
    )?;
    Ok((r.status, r.json().unwrap_or(serde_json::Value::Null)))
}

fn steps(c: &mut LocalCluster, opts: &DemoOptions) -> Result<(), String> {
    let mut t = Timeline {
        start: Instant::now(),
        events: Vec::new(),
    };
    let transport = match opts.transport {
        TransportKind::Quic => "QUIC",
        TransportKind::Tcp => "TCP",
    };
    println!("ha-node demo: primary, standby and witness as separate processes on loopback over {transport}, mutual TLS");
    println!("working directory: {}", c.dir().display());
    c.start_all()?;
    t.mark("started nodes 1, 2 (data) and 3 (witness)");
    let (first, s) = c.wait_for_primary(STEP)?;
    let p = first.node_id;
    t.mark(format!(
        "node {p} is primary (term {}), node {s} standby",
        first.term
    ));

    // Writes with a live line of progress.
    let mut acked: BTreeMap<String, String> = BTreeMap::new();
    let began = Instant::now();
    for i in 0..opts.keys {
        let key = format!("demo/key-{i:05}");
        let value = format!("value-{i}");
        let (status, body) = put(c, c.api(p), &key, &value)?;
        if status != 200 {
            return Err(format!("write {key}: {status} {body}"));
        }
        acked.insert(key, value);
        if i % 50 == 0 || i + 1 == opts.keys {
            print!("\r  writing: {}/{} acknowledged", i + 1, opts.keys);
            let _ = std::io::stdout().flush();
        }
    }
    println!();
    let rate = opts.keys as f64 / began.elapsed().as_secs_f64().max(1e-9);
    t.mark(format!(
        "{} writes acknowledged ({rate:.0}/s, one at a time)",
        opts.keys
    ));
    let rss_before: Vec<(u64, Option<u64>, Option<u64>)> = crate::local::MEMBERS
        .iter()
        .map(|id| (*id, c.rss(*id), c.private_rss(*id)))
        .collect();

    // Kill the primary; the first acknowledged write on the standby ends the gap.
    c.kill(p);
    let killed = Instant::now();
    t.mark(format!("SIGKILL node {p} (the primary)"));
    let deadline = killed + STEP;
    let failover = loop {
        let (status, body) = put(c, c.api(s), "demo/after-failover", "x")?;
        if status == 200 {
            acked.insert("demo/after-failover".into(), "x".into());
            break killed.elapsed();
        }
        if Instant::now() >= deadline {
            return Err(format!("node {s} did not take over: {status} {body}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let st = c.status(s)?;
    t.mark(format!(
        "node {s} took over (term {}); first acknowledged write {:.0} ms after the kill",
        st.term,
        failover.as_secs_f64() * 1000.0
    ));

    // Every acknowledged write is on the new primary.
    check_all(c, s, &acked)?;
    t.mark(format!(
        "all {} acknowledged writes read back from node {s}",
        acked.len()
    ));

    // The old primary rejoins as standby (its file still says primary).
    c.start(p)?;
    let new_commit = c.status(s)?.commit_index;
    c.wait_for(&[p], STEP, "the old primary to rejoin as standby", |x| {
        x.role == "standby" && x.applied_index >= new_commit
    })?;
    t.mark(format!(
        "node {p} restarted and rejoined as standby, caught up to index {new_commit}"
    ));

    // Planned switchover back.
    let r = c
        .client()
        .request("POST", &format!("{}/v1/admin/switchover", c.api(s)), None)?;
    if r.status != 200 {
        return Err(format!("switchover: {} {}", r.status, r.text()));
    }
    let back = c.wait_for(&[p], STEP, "the switchover", |x| x.writable)?;
    let (status, body) = put(c, c.api(p), "demo/after-switchover", "y")?;
    if status != 200 {
        return Err(format!("write after switchover: {status} {body}"));
    }
    acked.insert("demo/after-switchover".into(), "y".into());
    check_all(c, p, &acked)?;
    t.mark(format!(
        "switchover: node {p} is primary again (term {}), no write lost",
        back.term
    ));

    println!();
    println!("summary ({transport}):");
    println!(
        "  failover: {:.0} ms from SIGKILL to the next acknowledged write",
        failover.as_secs_f64() * 1000.0
    );
    println!(
        "  acknowledged writes: {}, all present after failover and switchover",
        acked.len()
    );
    println!("  resident memory before the kill:");
    for (id, rss, private) in rss_before {
        let what = if id == WITNESS {
            "witness, target 10 MB"
        } else {
            "data node, target 30 MB"
        };
        match rss {
            Some(b) => match private {
                Some(p) => println!(
                    "    node {id}: {:.1} MB, {:.1} MB of it private, the rest shared code ({what})",
                    b as f64 / 1e6,
                    p as f64 / 1e6
                ),
                None => println!("    node {id}: {:.1} MB ({what})", b as f64 / 1e6),
            },
            None => println!("    node {id}: unknown"),
        }
    }
    println!("  timeline:");
    let mut prev = Duration::ZERO;
    for (at, what) in &t.events {
        println!(
            "    {:>8.3}s (+{:>6.0} ms)  {what}",
            at.as_secs_f64(),
            (*at - prev).as_secs_f64() * 1000.0
        );
        prev = *at;
    }
    println!("demo passed");
    Ok(())
}

fn check_all(c: &LocalCluster, id: u64, acked: &BTreeMap<String, String>) -> Result<(), String> {
    for (k, v) in acked {
        let r = c.client().request(
            "GET",
            &format!("{}/v1/kv/{}", c.api(id), encode_key(k)),
            None,
        )?;
        if r.status != 200 || r.body != v.as_bytes() {
            return Err(format!(
                "acknowledged write {k}={v} missing on node {id}: {} {}",
                r.status,
                r.text()
            ));
        }
    }
    Ok(())
}
