//! `cargo xtask demo`: a readable simulated failover (until `ha-node` exists, the
//! main job in the README). It runs the real engine in the deterministic simulator:
//! a client writes steadily, the primary is killed, the standby takes over, the old
//! primary rejoins, and a planned switchover hands leadership back.

use std::process::ExitCode;
use std::time::Duration;

use ha_core::testkit::sim::{run, Scripted, SimConfig};

pub fn run_demo() -> ExitCode {
    let mut c = SimConfig::default();
    c.faults.mean_fault_interval_ms = 0;
    c.faults.drop = 0.0;
    c.faults.duplicate = 0.0;
    c.faults.delay_spike = 0.0;
    c.faults.preempt = 0.0;
    c.faults.delay_us = (50, 150);
    c.switchover = 0.0;
    c.fault_time = Duration::from_secs(4);
    c.heal_time = Duration::from_secs(3);
    c.mean_op_interval_us = 1_000;
    c.script = vec![
        (Duration::from_millis(1_000), Scripted::CrashPrimary),
        (Duration::from_millis(2_000), Scripted::RestartAll),
        (Duration::from_millis(3_500), Scripted::Switchover),
    ];
    println!("Simulated cluster: data nodes n1 and n2, witness n3; sync commit; heartbeat 50 ms,");
    println!("failover timeout 150-250 ms; a client writes about once per millisecond.\n");
    let r = run(42, &c);
    for (t, what) in &r.timeline {
        println!("t = {:>8.1} ms  {what}", *t as f64 / 1e6);
    }
    println!();
    println!(
        "writes acknowledged: {}   elections: {}   snapshots installed: {}",
        r.stats.writes_acked, r.stats.elections, r.stats.snapshots_installed
    );
    println!("invariants checked after every step (no split brain, no lost acknowledged write, ...): {} violations", r.violations.len());
    for v in &r.violations {
        println!("  violation: {v}");
    }
    if r.violations.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
