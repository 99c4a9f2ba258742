//! The command line as the API's client: `status`, `kv`, and the admin calls.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use crate::client::{Client, Reply};
use crate::json::{ListJson, StatusJson};

/// The API a command talks to when `--api` is not given.
pub const DEFAULT_API: &str = "http://127.0.0.1:8001";

/// The admin token: the flag, else `HA_NODE_TOKEN`, else the file.
pub fn token(flag: Option<String>, file: Option<&Path>) -> Result<Option<String>, String> {
    if let Some(t) = flag {
        return Ok(Some(t));
    }
    if let Ok(t) = std::env::var("HA_NODE_TOKEN") {
        if !t.is_empty() {
            return Ok(Some(t));
        }
    }
    match file {
        Some(f) => std::fs::read_to_string(f)
            .map(|t| Some(t.trim().to_string()))
            .map_err(|e| format!("--token-file {}: {e}", f.display())),
        None => Ok(None),
    }
}

/// One member's API and what it answered.
pub type Row = (String, Result<StatusJson, String>);

/// The whole cluster as the node at `api` and its peers report it.
pub fn cluster(client: &Client, api: &str) -> Result<Vec<Row>, String> {
    let first = client.status(api)?;
    let mut rows = vec![(api.trim_end_matches('/').to_string(), Ok(first.clone()))];
    for p in &first.peers {
        if let Some(peer_api) = &p.api {
            rows.push((peer_api.clone(), client.status(peer_api)));
        }
    }
    rows.sort_by_key(|(_, s)| s.as_ref().map(|s| s.node_id).unwrap_or(u64::MAX));
    Ok(rows)
}

/// A readable table of [`cluster`]'s rows.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<5} {:<8} {:<10} {:>6} {:>9} {:>9} {:>7} {:>12}  {:<8} API",
        "NODE", "KIND", "ROLE", "TERM", "COMMIT", "APPLIED", "LAG", "CONTACT(ms)", "HEALTH"
    );
    // Last contact as seen by the primary, if one answered.
    let primary = rows
        .iter()
        .filter_map(|(_, s)| s.as_ref().ok())
        .find(|s| s.role == "primary");
    for (api, s) in rows {
        match s {
            Ok(s) => {
                let contact = primary
                    .and_then(|p| p.peers.iter().find(|x| x.id == s.node_id))
                    .and_then(|x| x.last_contact_ms)
                    .map_or("-".to_string(), |m| m.to_string());
                let health = if !s.running {
                    "stopped"
                } else if s.failover_paused {
                    "paused"
                } else {
                    "ok"
                };
                let _ = writeln!(
                    out,
                    "{:<5} {:<8} {:<10} {:>6} {:>9} {:>9} {:>7} {:>12}  {:<8} {}",
                    s.node_id,
                    s.kind,
                    s.role,
                    s.term,
                    s.commit_index,
                    s.applied_index,
                    s.lag,
                    contact,
                    health,
                    api
                );
            }
            Err(e) => {
                let _ = writeln!(out, "{:<5} {:<8} {:<10} unreachable: {e}", "?", "?", "down");
            }
        }
    }
    out
}

/// Sends a KV call to `api`, following one `not_primary` answer to the
/// primary it names.
pub fn kv_call(
    client: &Client,
    api: &str,
    method: &str,
    path_and_query: &str,
    body: Option<&[u8]>,
) -> Result<Reply, String> {
    let url = format!("{}{path_and_query}", api.trim_end_matches('/'));
    let r = client.request(method, &url, body)?;
    if r.status == 503 {
        if let Ok(j) = r.json() {
            if j["error"] == "not_primary" {
                if let Some(p) = j["primary"].as_str() {
                    if p.trim_end_matches('/') != api.trim_end_matches('/') {
                        let url = format!("{}{path_and_query}", p.trim_end_matches('/'));
                        return client.request(method, &url, body);
                    }
                }
            }
        }
    }
    Ok(r)
}

/// Percent-encodes a key for a URL path (slashes kept: keys may hold them).
pub fn encode_key(key: &str) -> String {
    let mut s = String::new();
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~/".contains(&b) {
            s.push(b as char);
        } else {
            let _ = write!(s, "%{b:02X}");
        }
    }
    s
}

/// Renders a listing.
pub fn list_lines(body: &[u8]) -> Result<String, String> {
    let l: ListJson = serde_json::from_slice(body).map_err(|e| format!("bad listing: {e}"))?;
    let mut out = String::new();
    for it in &l.items {
        let v = it
            .value
            .clone()
            .or_else(|| it.value_base64.as_ref().map(|b| format!("base64:{b}")))
            .unwrap_or_default();
        let _ = writeln!(out, "{}\t{}\t{}", it.key, it.mod_index, v);
    }
    if let Some(next) = &l.next_start_after {
        let _ = writeln!(out, "(more: --start-after {next})");
    }
    Ok(out)
}

/// A client with the CLI's timeout.
pub fn client(token: Option<String>) -> Client {
    Client::new(Duration::from_secs(10), token)
}
