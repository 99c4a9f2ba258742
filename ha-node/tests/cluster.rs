//! Real `ha-node` processes on loopback, over QUIC and over TCP: the API's
//! answers on each member, a locked data directory, admin refusals, a paused
//! failover, SIGKILL of the primary with every acknowledged write kept, rejoin
//! and switchover. Every wait polls the API's published state, bounded.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ha_node::client::{Client, Reply};
use ha_node::config::TransportKind;
use ha_node::local::{LocalCluster, LocalOptions, WITNESS};

const STEP: Duration = Duration::from_secs(30);

fn exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_ha-node"))
}

fn call(c: &Client, method: &str, url: &str, body: Option<&[u8]>) -> Reply {
    c.request(method, url, body)
        .unwrap_or_else(|e| panic!("{method} {url}: {e}"))
}

fn json(r: &Reply) -> serde_json::Value {
    r.json().unwrap_or_else(|e| panic!("{e}"))
}

/// Announces a 2 MiB value and sends none of it; the answer's status.
fn oversized_put(api: &str) -> u16 {
    use std::io::{Read, Write};
    let addr = api.trim_start_matches("http://");
    let mut conn = std::net::TcpStream::connect(addr).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let head = format!(
        "PUT /v1/kv/big HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\n\r\n",
        2 * 1024 * 1024
    );
    conn.write_all(head.as_bytes()).expect("write");
    let mut buf = [0u8; 64];
    let n = conn.read(&mut buf).expect("read");
    let line = String::from_utf8_lossy(&buf[..n]).into_owned();
    line.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {line:?}"))
}

fn scenario(transport: TransportKind) {
    let mut c = LocalCluster::create(
        exe(),
        &LocalOptions {
            transport,
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
    let admin = c.client().clone();

    // Writes, reads, compare-and-set, listing on the primary.
    let mut acked: BTreeMap<String, String> = BTreeMap::new();
    let r = call(&anon, "PUT", &format!("{pa}/v1/kv/app/a"), Some(b"1"));
    assert_eq!(r.status, 200, "{}", r.text());
    let a_index = json(&r)["index"].as_u64().expect("index");
    assert!(json(&r)["term"].as_u64().is_some());
    acked.insert("app/a".into(), "1".into());
    let r = call(&anon, "GET", &format!("{pa}/v1/kv/app/a"), None);
    assert_eq!((r.status, r.body.as_slice()), (200, &b"1"[..]));
    assert_eq!(r.header("x-mod-index"), Some(a_index.to_string().as_str()));
    let r = call(
        &anon,
        "PUT",
        &format!("{pa}/v1/kv/app/a?if_mod_index=0"),
        Some(b"2"),
    );
    assert_eq!(r.status, 412, "{}", r.text());
    assert_eq!(json(&r)["mod_index"].as_u64(), Some(a_index));
    let r = call(
        &anon,
        "PUT",
        &format!("{pa}/v1/kv/app/a?if_mod_index={a_index}"),
        Some(b"2"),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    acked.insert("app/a".into(), "2".into());
    for k in ["app/b", "app/c", "other/x"] {
        let r = call(&anon, "PUT", &format!("{pa}/v1/kv/{k}"), Some(k.as_bytes()));
        assert_eq!(r.status, 200, "{}", r.text());
        acked.insert(k.into(), k.into());
    }
    let r = call(&anon, "DELETE", &format!("{pa}/v1/kv/app/c"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    acked.remove("app/c");
    let r = call(
        &anon,
        "GET",
        &format!("{pa}/v1/kv?prefix=app/&limit=1"),
        None,
    );
    let page = json(&r);
    assert_eq!(page["items"][0]["key"], "app/a");
    assert_eq!(page["more"], true);
    let r = call(
        &anon,
        "GET",
        &format!("{pa}/v1/kv?prefix=app/&start_after=app/a"),
        None,
    );
    let page = json(&r);
    assert_eq!(page["items"].as_array().map(Vec::len), Some(1));
    assert_eq!(page["items"][0]["key"], "app/b");
    assert_eq!(page["more"], false);
    assert_eq!(
        call(&anon, "GET", &format!("{pa}/v1/kv/app/c"), None).status,
        404
    );
    let long = "k".repeat(2000);
    assert_eq!(
        call(&anon, "PUT", &format!("{pa}/v1/kv/{long}"), Some(b"v")).status,
        414
    );
    // A body over the limit is refused from its announced length, before it is
    // sent (a client still sending would see the connection close instead).
    assert_eq!(oversized_put(&pa), 413);

    // The standby and the witness refuse writes, naming the primary.
    for api in [&sa, &wa] {
        let r = call(&anon, "PUT", &format!("{api}/v1/kv/app/z"), Some(b"v"));
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(json(&r)["error"], "not_primary");
        assert_eq!(json(&r)["primary"].as_str(), Some(pa.as_str()));
    }
    let r = call(&anon, "GET", &format!("{sa}/v1/kv/app/a"), None);
    assert_eq!(
        (r.status, json(&r)["error"].clone()),
        (503, "not_primary".into())
    );
    let want = c.status(p).expect("status").commit_index;
    c.wait_for(&[s], STEP, "the standby to apply", |x| {
        x.applied_index >= want
    })
    .expect("applied");
    let r = call(&anon, "GET", &format!("{sa}/v1/kv/app/a?stale=true"), None);
    assert_eq!((r.status, r.body.as_slice()), (200, &b"2"[..]));
    let r = call(&anon, "GET", &format!("{wa}/v1/kv/app/a?stale=true"), None);
    assert_eq!(
        (r.status, json(&r)["error"].clone()),
        (503, "witness".into())
    );
    // Health checks.
    assert_eq!(
        call(&anon, "GET", &format!("{wa}/health"), None).status,
        200
    );
    assert_eq!(
        call(&anon, "GET", &format!("{pa}/primary"), None).status,
        200
    );
    assert_eq!(
        call(&anon, "GET", &format!("{sa}/primary"), None).status,
        503
    );
    assert_eq!(
        call(&anon, "GET", &format!("{sa}/standby"), None).status,
        200
    );
    assert_eq!(
        call(&anon, "GET", &format!("{pa}/standby"), None).status,
        503
    );
    let st = json(&call(&anon, "GET", &format!("{sa}/v1/status"), None));
    assert_eq!(st["role"], "standby");
    assert!(
        st["lease_remaining_ms"].is_null(),
        "a standby holds no lease"
    );
    // The primary's lease is shorter than the failover timeout (500 ms here).
    let lease = c
        .wait_for(&[p], STEP, "the primary's lease", |x| {
            x.writable && x.lease_remaining_ms.is_some()
        })
        .expect("lease")
        .lease_remaining_ms;
    assert!(lease.is_some_and(|ms| ms < 500), "lease {lease:?}");
    assert_eq!(st["leader_api"].as_str(), Some(pa.as_str()));
    assert_eq!(st["peers"].as_array().map(Vec::len), Some(2));

    // Admin calls need the token.
    let r = call(&anon, "POST", &format!("{sa}/v1/admin/promote"), None);
    assert_eq!(r.status, 401, "{}", r.text());
    let wrong = Client::new(
        Duration::from_secs(5),
        Some("wrong-token-0123456789".into()),
    );
    let r = call(
        &wrong,
        "POST",
        &format!("{pa}/v1/admin/pause-failover"),
        None,
    );
    assert_eq!(r.status, 403, "{}", r.text());

    // A second process on a data directory in use is refused.
    let out = Command::new(exe())
        .arg("run")
        .arg("--config")
        .arg(c.config(p))
        .output()
        .expect("second process");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already in use"), "{err}");

    // Paused failover: with the primary killed, the standby does not take over
    // (observed for three failover timeouts) until failover is resumed.
    let r = call(
        &admin,
        "POST",
        &format!("{pa}/v1/admin/pause-failover"),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(json(&r)["unreachable"].as_array().map(Vec::len), Some(0));
    c.wait_for(&[s], STEP, "the pause to reach the standby", |x| {
        x.failover_paused
    })
    .expect("paused");
    let want = c.status(p).expect("status").commit_index;
    c.wait_for(&[s], STEP, "the standby to hold every write", |x| {
        x.last_index >= want
    })
    .expect("caught up");
    c.kill(p);
    let watch_until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < watch_until {
        let st = c.status(s).expect("standby status");
        assert_ne!(st.role, "primary", "elected while failover was paused");
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = call(
        &admin,
        "POST",
        &format!("{sa}/v1/admin/resume-failover"),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    c.wait_for(&[s], STEP, "the standby to take over", |x| x.writable)
        .expect("failover");
    for (k, v) in &acked {
        let r = call(&anon, "GET", &format!("{sa}/v1/kv/{k}"), None);
        assert_eq!(
            (r.status, r.body.as_slice()),
            (200, v.as_bytes()),
            "acknowledged {k} lost"
        );
    }
    let r = call(&anon, "PUT", &format!("{sa}/v1/kv/after"), Some(b"x"));
    assert_eq!(r.status, 200, "{}", r.text());
    acked.insert("after".into(), "x".into());

    // The old primary rejoins as standby whatever its file says, then takes
    // over again by switchover with nothing lost.
    c.start(p).expect("restart");
    let want = c.status(s).expect("status").commit_index;
    c.wait_for(&[p], STEP, "the old primary to rejoin", |x| {
        x.role == "standby" && x.applied_index >= want
    })
    .expect("rejoin");
    let r = call(&admin, "POST", &format!("{sa}/v1/admin/switchover"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    c.wait_for(&[p], STEP, "the switchover", |x| x.writable)
        .expect("switchover");
    for (k, v) in &acked {
        let r = call(&anon, "GET", &format!("{pa}/v1/kv/{k}"), None);
        assert_eq!((r.status, r.body.as_slice()), (200, v.as_bytes()), "{k}");
    }
    // A graceful stop exits 0.
    let status = c.terminate(WITNESS, Duration::from_secs(15));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    c.teardown(false);
}

#[test]
fn a_cluster_of_real_processes_over_quic() {
    scenario(TransportKind::Quic);
}

#[test]
fn a_cluster_of_real_processes_over_tcp() {
    scenario(TransportKind::Tcp);
}
