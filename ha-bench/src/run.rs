//! One run: start the members, find the primary, drive closed-loop writers through
//! a warm-up and a measured window, sample the nodes' counters, shut down.

use std::sync::Arc;
use std::time::Duration;

use ha_core::driver::Metrics;
use ha_core::{Replicator, Term, Transport};
use ha_wal::WalMetrics;
use hdrhistogram::Histogram;
use tokio::time::Instant;

use crate::cluster::{BenchNode, BenchStore, BoxError};
use crate::kv::{key_for, put_command};

/// Bytes of every written value.
pub const VALUE_LEN: usize = 100;
/// How long to wait for a writable primary after start.
const PRIMARY_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline of one write.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on each node's shutdown.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// Latencies are recorded in microseconds up to this (larger ones saturate).
const MAX_LATENCY_US: u64 = 60_000_000;

/// What one run does.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    /// Closed-loop writers.
    pub clients: usize,
    /// Writes before the measured window starts (not measured).
    pub warmup: Duration,
    /// The measured window.
    pub window: Duration,
    /// The window is reported in intervals of this length (the last may be
    /// shorter); equal to `window` for one row.
    pub interval: Duration,
    /// Distinct keys written, spread over the clients: each client overwrites
    /// its share of them in turn, so the state (and every snapshot) stays this
    /// size however long the run.
    pub keys: u64,
}

impl Plan {
    fn intervals(&self) -> usize {
        let n = self
            .window
            .as_nanos()
            .div_ceil(self.interval.as_nanos().max(1));
        usize::try_from(n).unwrap_or(usize::MAX).max(1)
    }
}

/// Latencies and throughput over part of the measured window.
#[derive(Debug)]
pub struct Slice {
    /// Seconds from the window's start to this slice's start.
    pub from_secs: f64,
    /// Its length in seconds.
    pub secs: f64,
    /// Writes acknowledged in it (started and finished inside the window).
    pub writes: u64,
    /// Their latencies, microseconds.
    pub latency: Histogram<u64>,
    /// Term changes on the data nodes during it (the largest of the two).
    pub term_changes: u64,
}

impl Slice {
    /// Acknowledged writes per second.
    pub fn writes_per_sec(&self) -> f64 {
        if self.secs > 0.0 {
            self.writes as f64 / self.secs
        } else {
            0.0
        }
    }
}

/// Per-node figures over the measured window.
#[derive(Debug, Clone, Copy)]
pub struct NodeFigures {
    /// `entries_appended / appends` (None without appends).
    pub entries_per_append: Option<f64>,
    /// WAL entries per fsync (None for a store without a WAL, or no fsync).
    pub entries_per_fsync: Option<f64>,
    /// `Metrics::role_changes` delta.
    pub role_changes: u64,
    /// `Metrics::tick_lateness.max_us` at the end (a running max since start).
    pub tick_late_max_us: u64,
}

/// Everything one run reports.
#[derive(Debug)]
pub struct Outcome {
    /// The whole measured window.
    pub total: Slice,
    /// The window in `Plan::interval` pieces.
    pub slices: Vec<Slice>,
    /// The primary at the start of the window.
    pub primary: NodeFigures,
    /// The standby at the start of the window.
    pub standby: NodeFigures,
    /// Writes that failed, over the warm-up and the window.
    pub errors: u64,
    /// The first failed write's error.
    pub first_error: Option<String>,
    /// Problems at shutdown (the numbers still stand).
    pub shutdown_errors: Vec<String>,
}

/// One reading of a data node's counters.
#[derive(Debug, Clone)]
struct NodeSample {
    metrics: Metrics,
    wal: Option<WalMetrics>,
    term: Term,
}

fn sample<T: Transport, L: BenchStore>(node: &BenchNode<T, L>) -> NodeSample {
    NodeSample {
        metrics: node.metrics(),
        wal: node.store().wal_metrics(),
        term: node.term(),
    }
}

fn ratio(num: u64, den: u64) -> Option<f64> {
    (den > 0).then(|| num as f64 / den as f64)
}

fn figures(before: &NodeSample, after: &NodeSample) -> NodeFigures {
    let (b, a) = (&before.metrics, &after.metrics);
    let wal = match (&before.wal, &after.wal) {
        (Some(b), Some(a)) => {
            let d = a.since(b);
            (d.fsyncs > 0).then(|| d.entries_per_fsync())
        }
        _ => None,
    };
    NodeFigures {
        entries_per_append: ratio(
            a.entries_appended.saturating_sub(b.entries_appended),
            a.appends.saturating_sub(b.appends),
        ),
        entries_per_fsync: wal,
        role_changes: a.role_changes.saturating_sub(b.role_changes),
        tick_late_max_us: a.tick_lateness.max_us,
    }
}

fn term_changes(before: &[NodeSample; 2], after: &[NodeSample; 2]) -> u64 {
    before
        .iter()
        .zip(after)
        .map(|(b, a)| a.term.number.saturating_sub(b.term.number))
        .max()
        .unwrap_or(0)
}

fn histogram() -> Result<Histogram<u64>, BoxError> {
    Ok(Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)?)
}

/// Starts `nodes` (data nodes first, the witness last), measures, and shuts every
/// node down whatever happened.
pub async fn run<T: Transport, L: BenchStore>(
    nodes: Vec<BenchNode<T, L>>,
    plan: Plan,
) -> Result<Outcome, BoxError> {
    let result = match start_all(&nodes).await {
        Ok(()) => measure(&nodes, plan).await,
        Err(e) => Err(e),
    };
    let mut shutdown_errors = Vec::new();
    for n in &nodes {
        match tokio::time::timeout(SHUTDOWN_TIMEOUT, n.shutdown()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => shutdown_errors.push(format!("{} shutdown: {e}", n.node_id())),
            Err(_) => shutdown_errors.push(format!(
                "{} shutdown did not finish in {SHUTDOWN_TIMEOUT:?}",
                n.node_id()
            )),
        }
    }
    drop(nodes);
    result.map(|mut o| {
        o.shutdown_errors = shutdown_errors;
        o
    })
}

async fn start_all<T: Transport, L: BenchStore>(nodes: &[BenchNode<T, L>]) -> Result<(), BoxError> {
    for n in nodes {
        n.start()
            .await
            .map_err(|e| format!("{} start: {e}", n.node_id()))?;
    }
    Ok(())
}

/// The index in `data` of a writable primary, waiting at most `timeout`.
async fn writable<T: Transport, L: BenchStore>(
    data: &[BenchNode<T, L>],
    timeout: Duration,
) -> Option<usize> {
    let deadline = Instant::now() + timeout;
    loop {
        for (i, n) in data.iter().enumerate() {
            if n.status().writable {
                return Some(i);
            }
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        let slice = (deadline - now).min(Duration::from_millis(25));
        for n in data {
            if n.wait_status(|s| s.writable, slice / 2).await.is_ok() {
                break;
            }
        }
    }
}

/// What one client task measured.
struct ClientResult {
    slices: Vec<Histogram<u64>>,
    errors: u64,
    first_error: Option<String>,
}

struct Window {
    t0: Instant,
    t1: Instant,
    interval: Duration,
    intervals: usize,
    keys_per_client: u64,
}

async fn client<T: Transport, L: BenchStore>(
    id: u64,
    data: Arc<Vec<BenchNode<T, L>>>,
    mut current: usize,
    window: Arc<Window>,
) -> Result<ClientResult, String> {
    let mut slices = (0..window.intervals)
        .map(|_| histogram().map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    let mut errors = 0;
    let mut first_error = None;
    let value = [0xA5u8; VALUE_LEN];
    let mut counter = 0u64;
    loop {
        let started = Instant::now();
        if started >= window.t1 {
            break;
        }
        let command = put_command(key_for(id, counter % window.keys_per_client), &value);
        counter += 1;
        match data[current].apply(command, WRITE_TIMEOUT).await {
            Ok(_) => {
                let done = Instant::now();
                if started >= window.t0 && done <= window.t1 {
                    let k = (done - window.t0).as_nanos() / window.interval.as_nanos().max(1);
                    let k = usize::try_from(k)
                        .unwrap_or(usize::MAX)
                        .min(window.intervals - 1);
                    let us = u64::try_from((done - started).as_micros()).unwrap_or(u64::MAX);
                    slices[k].saturating_record(us.max(1));
                }
            }
            Err(e) => {
                errors += 1;
                if first_error.is_none() {
                    first_error = Some(e.to_string());
                }
                if matches!(e, ha_core::Error::Closed) {
                    break;
                }
                // The primary may have moved: look for the writable one, briefly.
                tokio::time::sleep(Duration::from_millis(10)).await;
                if let Some(i) = writable(&data, Duration::from_secs(1)).await {
                    current = i;
                }
            }
        }
    }
    Ok(ClientResult {
        slices,
        errors,
        first_error,
    })
}

async fn measure<T: Transport, L: BenchStore>(
    nodes: &[BenchNode<T, L>],
    plan: Plan,
) -> Result<Outcome, BoxError> {
    let data: Arc<Vec<BenchNode<T, L>>> = Arc::new(nodes[..2].to_vec());
    let primary = writable(&data, PRIMARY_TIMEOUT)
        .await
        .ok_or_else(|| format!("no writable primary within {PRIMARY_TIMEOUT:?}"))?;
    let standby = 1 - primary;

    let start = Instant::now();
    let t0 = start + plan.warmup;
    let intervals = plan.intervals();
    let window = Arc::new(Window {
        t0,
        t1: t0 + plan.window,
        interval: plan.interval,
        intervals,
        keys_per_client: (plan.keys / plan.clients.max(1) as u64).max(1),
    });
    let tasks: Vec<_> = (0..plan.clients)
        .map(|c| {
            tokio::spawn(client(
                c as u64,
                Arc::clone(&data),
                primary,
                Arc::clone(&window),
            ))
        })
        .collect();

    // Counter readings at every interval boundary (the last at the window's end).
    let mut samples = Vec::with_capacity(intervals + 1);
    for k in 0..=intervals {
        let at = (t0 + plan.interval * u32::try_from(k).unwrap_or(u32::MAX)).min(window.t1);
        tokio::time::sleep_until(at).await;
        samples.push([sample(&data[0]), sample(&data[1])]);
    }

    let mut merged = Vec::with_capacity(intervals);
    for _ in 0..intervals {
        merged.push(histogram()?);
    }
    let mut errors = 0;
    let mut first_error = None;
    let join_deadline = window.t1 + WRITE_TIMEOUT + Duration::from_secs(5);
    for t in tasks {
        let r = match tokio::time::timeout_at(join_deadline, t).await {
            Ok(Ok(Ok(r))) => r,
            Ok(Ok(Err(e))) => return Err(format!("client: {e}").into()),
            Ok(Err(e)) => return Err(format!("client task: {e}").into()),
            Err(_) => return Err("a client did not finish after the window".into()),
        };
        for (m, h) in merged.iter_mut().zip(&r.slices) {
            m.add(h)?;
        }
        errors += r.errors;
        if first_error.is_none() {
            first_error = r.first_error;
        }
    }

    let first = &samples[0];
    let last = &samples[intervals];
    let mut total = histogram()?;
    let mut slices = Vec::with_capacity(intervals);
    for (k, h) in merged.into_iter().enumerate() {
        total.add(&h)?;
        let from = plan.interval * u32::try_from(k).unwrap_or(u32::MAX);
        let to = (from + plan.interval).min(plan.window);
        slices.push(Slice {
            from_secs: from.as_secs_f64(),
            secs: to.saturating_sub(from).as_secs_f64(),
            writes: h.len(),
            latency: h,
            term_changes: term_changes(&samples[k], &samples[k + 1]),
        });
    }
    Ok(Outcome {
        total: Slice {
            from_secs: 0.0,
            secs: plan.window.as_secs_f64(),
            writes: total.len(),
            latency: total,
            term_changes: term_changes(first, last),
        },
        slices,
        primary: figures(&first[primary], &last[primary]),
        standby: figures(&first[standby], &last[standby]),
        errors,
        first_error,
        shutdown_errors: Vec::new(),
    })
}
