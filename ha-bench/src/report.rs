//! The Markdown output: a header (commit, date, machine), tables printed a row at
//! a time as runs finish, and notes under each table.

use std::io::Write;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::run::{NodeFigures, Outcome, Slice};

/// Columns of the main table.
pub const MAIN_COLUMNS: &[&str] = &[
    "network",
    "store",
    "mode",
    "clients",
    "writes/s",
    "p50 ms",
    "p99 ms",
    "max ms",
    "entries/append primary",
    "entries/append standby",
    "entries/fsync primary",
    "entries/fsync standby",
    "leader changes",
    "max tick late ms",
    "load",
];

/// Columns of the soak's interval table.
pub const SOAK_COLUMNS: &[&str] = &[
    "interval",
    "from s",
    "to s",
    "writes/s",
    "p50 ms",
    "p99 ms",
    "max ms",
    "leader changes",
];

/// The cells of one row.
pub type Row = Vec<String>;

/// A table being printed: the header at once, rows as they come, notes at the end.
pub struct Table {
    notes: Vec<String>,
}

impl Table {
    /// Prints the header line and the separator.
    pub fn new(columns: &[&str]) -> Table {
        println!("| {} |", columns.join(" | "));
        let sep: Vec<&str> = columns.iter().map(|_| "---").collect();
        println!("|{}|", sep.join("|"));
        flush();
        Table { notes: Vec::new() }
    }

    /// Prints one row.
    pub fn row(&mut self, cells: Row) {
        println!("| {} |", cells.join(" | "));
        flush();
    }

    /// Remembers notes to print under the table.
    pub fn notes(&mut self, notes: Vec<String>) {
        self.notes.extend(notes);
    }

    /// Prints the notes.
    pub fn finish(self) {
        if !self.notes.is_empty() {
            println!();
            for n in &self.notes {
                println!("- {n}");
            }
        }
        flush();
    }
}

fn flush() {
    let _ = std::io::stdout().flush();
}

/// `text` on one line, safe inside a table cell.
pub fn one_line(text: &str) -> String {
    text.replace(['\n', '\r'], " ").replace('|', "/")
}

fn ms(us: u64) -> String {
    let ms = us as f64 / 1e3;
    if ms < 10.0 {
        format!("{ms:.3}")
    } else {
        format!("{ms:.1}")
    }
}

fn opt(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.1}"))
        .unwrap_or_else(|| "-".to_owned())
}

fn latency_cells(s: &Slice) -> [String; 4] {
    if s.writes == 0 {
        return [
            "0".to_owned(),
            "-".to_owned(),
            "-".to_owned(),
            "-".to_owned(),
        ];
    }
    [
        format!("{:.0}", s.writes_per_sec()),
        ms(s.latency.value_at_quantile(0.50)),
        ms(s.latency.value_at_quantile(0.99)),
        ms(s.latency.max()),
    ]
}

fn leader_changes(o: &Outcome) -> String {
    let roles = o.primary.role_changes + o.standby.role_changes;
    if roles == 0 {
        o.total.term_changes.to_string()
    } else {
        format!(
            "{} (role changes {}/{})",
            o.total.term_changes, o.primary.role_changes, o.standby.role_changes
        )
    }
}

fn tick_late(p: &NodeFigures, s: &NodeFigures) -> String {
    ms(p.tick_late_max_us.max(s.tick_late_max_us))
}

/// A finished run's row.
pub fn main_row(layers: [String; 4], o: &Outcome) -> Row {
    let mut row: Row = layers.into();
    row.extend(latency_cells(&o.total));
    row.extend([
        opt(o.primary.entries_per_append),
        opt(o.standby.entries_per_append),
        opt(o.primary.entries_per_fsync),
        opt(o.standby.entries_per_fsync),
        leader_changes(o),
        tick_late(&o.primary, &o.standby),
        load(),
    ]);
    row
}

/// A failed run's row: the reason, then dashes.
pub fn failed_row(layers: [String; 4], error: &str) -> Row {
    let mut row: Row = layers.into();
    let mut reason = one_line(error);
    if reason.chars().count() > 120 {
        reason = reason.chars().take(117).collect::<String>() + "...";
    }
    row.push(format!("FAILED: {reason}"));
    row.extend((row.len()..MAIN_COLUMNS.len() - 1).map(|_| "-".to_owned()));
    row.push(load());
    row
}

/// One soak interval's row.
pub fn soak_row(k: usize, s: &Slice) -> Row {
    let mut row = vec![
        (k + 1).to_string(),
        format!("{:.0}", s.from_secs),
        format!("{:.0}", s.from_secs + s.secs),
    ];
    row.extend(latency_cells(s));
    row.push(s.term_changes.to_string());
    row
}

/// The 1-minute load average from /proc/loadavg ("?" if unreadable).
pub fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".to_owned())
}

fn git(args: &[&str]) -> Option<std::process::Output> {
    std::process::Command::new("git").args(args).output().ok()
}

/// `git rev-parse --short HEAD`, marked when tracked files differ from it.
fn commit() -> String {
    let Some(out) = git(&["rev-parse", "--short", "HEAD"]).filter(|o| o.status.success()) else {
        return "unknown".to_owned();
    };
    let hash = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let dirty = git(&["diff", "--quiet", "HEAD", "--"]).is_some_and(|o| o.status.code() == Some(1));
    if dirty {
        format!("{hash} (with uncommitted changes in the work tree)")
    } else {
        hash
    }
}

/// Days since 1970-01-01 to a (year, month, day) civil date (H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// The current UTC date and time, `YYYY-MM-DD HH:MM:SS UTC`.
fn now_utc() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let secs = i64::try_from(secs).unwrap_or(0);
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let t = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        t / 3600,
        t / 60 % 60,
        t % 60
    )
}

/// The filesystem type `path` lives on, from /proc/mounts (best effort).
fn fs_type(path: &Path) -> String {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let Ok(mounts) = std::fs::read_to_string("/proc/mounts") else {
        return "?".to_owned();
    };
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_dev, mount, kind) = (f.next()?, f.next()?, f.next()?);
            path.starts_with(mount)
                .then(|| (mount.len(), kind.to_owned()))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, kind)| kind)
        .unwrap_or_else(|| "?".to_owned())
}

/// Prints what the numbers belong to: commit, date, machine, command line.
pub fn print_header(tmp: &Path, cli: &str) {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("# ha-bench");
    println!();
    println!("- commit: {}", commit());
    println!("- date: {}", now_utc());
    println!(
        "- machine: {cores} cores, load {} at start; tokio runtime with 2 worker threads",
        load()
    );
    println!("- WAL temp dirs under {} ({})", tmp.display(), fs_type(tmp));
    println!("- command: `{cli}`");
    println!();
    flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
    }
}
