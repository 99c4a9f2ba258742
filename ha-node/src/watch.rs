//! The CLI's live views: `ha-node status --watch` (the cluster table redrawn
//! in place with a lag bar per standby) and `ha-node events [--follow]` (the
//! event history, then each new event as it happens).

use std::fmt::Write as _;
use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::cli::{self, Row};
use crate::client::Client;

/// The width of a lag bar, in characters.
const BAR: usize = 20;

/// A lag bar: empty at 0, full at a million entries, on a log scale so one
/// entry shows and a standby far behind does not overflow.
pub fn lag_bar(lag: u64) -> String {
    let filled = if lag == 0 {
        0
    } else {
        // One mark for the first entry, the rest by decades up to 10^6.
        let decades = (lag as f64).log10() / 6.0;
        (1 + (decades * (BAR - 1) as f64).floor() as usize).min(BAR)
    };
    format!("[{}{}]", "#".repeat(filled), ".".repeat(BAR - filled))
}

/// Milliseconds since the epoch as an RFC 3339 UTC time.
pub fn utc(at_ms: u64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(at_ms);
    humantime::format_rfc3339_millis(t).to_string()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One frame of `status --watch`: a header, the table, and the standbys'
/// lag bars.
pub fn frame(asked: &str, rows: Result<&[Row], &str>, at_ms: u64) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "ha-node status --watch   {asked}   {}   (Ctrl-C stops)\n",
        utc(at_ms)
    );
    match rows {
        Ok(rows) => {
            out.push_str(&cli::table(rows));
            out.push('\n');
            for (_, s) in rows {
                if let Ok(s) = s {
                    if s.kind == "data" && s.role != "primary" {
                        let _ = writeln!(
                            out,
                            "lag of node {:<3} {} {} entries",
                            s.node_id,
                            lag_bar(s.lag),
                            s.lag
                        );
                    }
                }
            }
        }
        Err(e) => {
            let _ = writeln!(out, "no member answered: {e}");
        }
    }
    out
}

/// Redraws the cluster table once a second until interrupted. When the member
/// asked stops answering, the others it listed are asked instead.
pub fn watch_status(client: &Client, api: &str) -> ! {
    let mut candidates = vec![api.trim_end_matches('/').to_string()];
    loop {
        let mut answer = Err(String::new());
        for c in &candidates {
            answer = cli::cluster(client, c);
            if answer.is_ok() {
                break;
            }
        }
        let text = match &answer {
            Ok(rows) => {
                // Keep the asked member first, then every API that answered
                // this time, for the next round.
                let asked = candidates[0].clone();
                let others = rows.iter().map(|(a, _)| a.clone()).filter(|a| *a != asked);
                candidates = std::iter::once(asked.clone()).chain(others).collect();
                frame(api, Ok(rows), now_ms())
            }
            Err(e) => frame(api, Err(e), now_ms()),
        };
        // Home the cursor, clear the screen, draw.
        let mut out = std::io::stdout().lock();
        let _ = write!(out, "\x1b[H\x1b[2J{text}");
        let _ = out.flush();
        drop(out);
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// A field's value as a line shows it: a term as its number, a list joined by
/// commas, a string bare.
fn field(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Object(m) if m.contains_key("number") => m["number"].to_string(),
        Value::Array(a) => a.iter().map(field).collect::<Vec<_>>().join(","),
        Value::Null => "-".to_string(),
        other => other.to_string(),
    }
}

/// One event as a line: sequence number, UTC time, kind, then its fields.
pub fn event_line(e: &Value) -> String {
    let mut line = format!(
        "{:>6}  {}  {:<20}",
        e["seq"].as_u64().unwrap_or(0),
        utc(e["at_ms"].as_u64().unwrap_or(0)),
        e["kind"].as_str().unwrap_or("?")
    );
    if let Value::Object(m) = e {
        for (k, v) in m {
            if !matches!(k.as_str(), "seq" | "at_ms" | "kind") {
                let _ = write!(line, " {k}={}", field(v));
            }
        }
    }
    line.trim_end().to_string()
}

/// How `events` prints.
#[derive(Clone, Copy, Debug)]
pub struct EventsOptions {
    /// Print events after this sequence number.
    pub since: u64,
    /// Keep going: wait for new events and print them as they come.
    pub follow: bool,
    /// One JSON object per line instead of text.
    pub json: bool,
}

/// How long one `--follow` request waits on the node for the next event.
const FOLLOW_WAIT_MS: u64 = 3000;

/// Prints the event history of the member at `api` to `out`; with `follow`
/// it never returns unless `out` fails, and rides out the member's restarts.
pub fn print_events(
    client: &Client,
    api: &str,
    opts: EventsOptions,
    out: &mut impl Write,
) -> Result<(), String> {
    let api = api.trim_end_matches('/');
    let mut since = opts.since;
    loop {
        let wait = if opts.follow {
            format!("&wait_ms={FOLLOW_WAIT_MS}")
        } else {
            String::new()
        };
        let url = format!("{api}/v1/events?since={since}{wait}");
        let answer = client.request("GET", &url, None).and_then(|r| {
            if r.status == 200 {
                r.json()
            } else {
                Err(format!("{} {}", r.status, r.text()))
            }
        });
        let body = match answer {
            Ok(b) => b,
            Err(e) if opts.follow => {
                eprintln!("{api}: {e} (retrying)");
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
            Err(e) => return Err(e),
        };
        let oldest = body["oldest"].as_u64().unwrap_or(0);
        if oldest > since.saturating_add(1) && !opts.json {
            writeln!(
                out,
                "({} older events are no longer held)",
                oldest - since - 1
            )
            .map_err(|e| e.to_string())?;
        }
        let events = body["events"].as_array().cloned().unwrap_or_default();
        for e in &events {
            let line = if opts.json {
                e.to_string()
            } else {
                event_line(e)
            };
            writeln!(out, "{line}").map_err(|e| e.to_string())?;
        }
        out.flush().map_err(|e| e.to_string())?;
        since = body["next_since"].as_u64().unwrap_or(since);
        if !opts.follow && events.len() < 1000 {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_lag_bar_is_empty_at_zero_shows_one_entry_and_fills_at_a_million() {
        assert_eq!(lag_bar(0), format!("[{}]", ".".repeat(BAR)));
        assert!(lag_bar(1).starts_with("[#."), "{}", lag_bar(1));
        assert!(lag_bar(1000).matches('#').count() > lag_bar(10).matches('#').count());
        assert_eq!(lag_bar(1_000_000), format!("[{}]", "#".repeat(BAR)));
        assert_eq!(lag_bar(u64::MAX), format!("[{}]", "#".repeat(BAR)));
    }

    fn member(id: u64, kind: &str, role: &str, lag: u64) -> crate::json::StatusJson {
        serde_json::from_value(json!({"node_id": id, "kind": kind, "role": role,
            "term": 4, "term_node": 1, "leader_id": 1, "leader_api": null,
            "writable": role == "primary", "commit_index": 90, "applied_index": 90,
            "last_index": 100 - lag, "lag": lag, "commit_mode": "sync",
            "degraded": false, "failover_paused": false, "running": true, "peers": []}))
        .expect("a status")
    }

    #[test]
    fn a_frame_has_the_table_and_a_lag_bar_per_standby_only() {
        let rows: Vec<Row> = vec![
            ("http://a".into(), Ok(member(1, "data", "primary", 0))),
            ("http://b".into(), Ok(member(2, "data", "standby", 37))),
            ("http://c".into(), Ok(member(3, "witness", "witness", 0))),
        ];
        let f = frame("http://a", Ok(&rows), 0);
        assert!(f.contains("1970-01-01T00:00:00.000Z"), "{f}");
        assert!(f.contains("NODE"), "{f}");
        let bars: Vec<&str> = f.lines().filter(|l| l.starts_with("lag of")).collect();
        assert_eq!(bars.len(), 1, "{f}");
        assert!(
            bars[0].contains("node 2") && bars[0].ends_with("37 entries"),
            "{f}"
        );
        assert!(bars[0].contains(&lag_bar(37)), "{f}");
        let down = frame("http://a", Err("connection refused"), 0);
        assert!(
            down.contains("no member answered: connection refused"),
            "{down}"
        );
    }

    #[test]
    fn an_event_line_shows_its_time_kind_and_fields() {
        let e = json!({"seq": 7, "at_ms": 0, "kind": "election_won",
            "term": {"number": 3, "node": 2}, "votes": [2, 3]});
        assert_eq!(
            event_line(&e),
            "     7  1970-01-01T00:00:00.000Z  election_won         term=3 votes=2,3"
        );
    }
}
