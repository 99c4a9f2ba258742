//! A three-process cluster on loopback (data nodes 1 and 2, witness 3), each
//! member a real `ha-node run` process: what `ha-node demo` runs and what the
//! integration tests drive. Everything lives in one temporary directory, and
//! every process is stopped and the directory removed on drop.

use std::collections::BTreeMap;
use std::fs;
use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::certs::{self, NodeArg};
use crate::client::Client;
use crate::config::TransportKind;
use crate::json::StatusJson;

/// The members: data nodes 1 and 2, witness 3.
pub const MEMBERS: [u64; 3] = [1, 2, 3];
/// The witness.
pub const WITNESS: u64 = 3;

/// The pids of running members, for a Ctrl-C handler to stop them.
pub type Pids = Arc<Mutex<BTreeMap<u64, u32>>>;

/// The cluster.
pub struct LocalCluster {
    exe: PathBuf,
    dir: Option<tempfile::TempDir>,
    apis: BTreeMap<u64, String>,
    children: BTreeMap<u64, Child>,
    pids: Pids,
    /// The admin token of every member.
    pub token: String,
    client: Client,
}

impl std::fmt::Debug for LocalCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCluster")
            .field("apis", &self.apis)
            .finish_non_exhaustive()
    }
}

fn free_tcp() -> std::io::Result<TcpListener> {
    TcpListener::bind("127.0.0.1:0")
}

/// Settings of a [`LocalCluster`].
#[derive(Clone, Debug)]
pub struct LocalOptions {
    /// The peer transport.
    pub transport: TransportKind,
    /// The commit mode's config name.
    pub commit_mode: String,
    /// Extra `[replication]` lines (e.g. `snapshot_every = 1000`).
    pub replication_extra: String,
    /// Extra sections (e.g. `[wal]` with its lines), appended to every config.
    pub sections_extra: String,
}

impl Default for LocalOptions {
    fn default() -> Self {
        LocalOptions {
            transport: TransportKind::Quic,
            commit_mode: "sync".into(),
            replication_extra: String::new(),
            sections_extra: String::new(),
        }
    }
}

impl LocalCluster {
    /// Writes certificates and configs into a new temporary directory (not yet
    /// started). `exe` is the `ha-node` binary.
    pub fn create(exe: &Path, opts: &LocalOptions) -> Result<LocalCluster, String> {
        let dir = tempfile::Builder::new()
            .prefix("ha-node-demo-")
            .tempdir()
            .map_err(|e| format!("temporary directory: {e}"))?;
        let nodes: Vec<NodeArg> = MEMBERS
            .iter()
            .map(|id| format!("{id}=127.0.0.1,localhost").parse())
            .collect::<Result<_, _>>()?;
        certs::write(&dir.path().join("certs"), &nodes, 2)
            .map_err(|e| format!("certificates: {e}"))?;
        // Ports: bound together so they differ, released just before the
        // processes bind them.
        let mut peers = BTreeMap::new();
        let mut apis = BTreeMap::new();
        {
            let mut hold_udp = Vec::new();
            let mut hold_tcp = Vec::new();
            for id in MEMBERS {
                let peer = match opts.transport {
                    TransportKind::Quic => {
                        let s = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
                        let a = s.local_addr().map_err(|e| e.to_string())?;
                        hold_udp.push(s);
                        a
                    }
                    TransportKind::Tcp => {
                        let l = free_tcp().map_err(|e| e.to_string())?;
                        let a = l.local_addr().map_err(|e| e.to_string())?;
                        hold_tcp.push(l);
                        a
                    }
                };
                let api = free_tcp().map_err(|e| e.to_string())?;
                let api_addr = api.local_addr().map_err(|e| e.to_string())?;
                hold_tcp.push(api);
                peers.insert(id, peer.to_string());
                apis.insert(id, api_addr.to_string());
            }
        }
        // Random per run (the standard library's hasher keys are random).
        let random = |n: u64| {
            use std::hash::BuildHasher;
            std::collections::hash_map::RandomState::new().hash_one((n, std::process::id()))
        };
        let token = format!("demo-{:016x}{:016x}", random(1), random(2));
        let transport = match opts.transport {
            TransportKind::Quic => "quic",
            TransportKind::Tcp => "tcp",
        };
        let mut members = String::new();
        for id in MEMBERS {
            let kind = if id == WITNESS { "witness" } else { "data" };
            members.push_str(&format!(
                "[[members]]\nid = {id}\npeer = \"{}\"\napi = \"http://{}\"\nkind = \"{kind}\"\n\n",
                peers[&id], apis[&id]
            ));
        }
        for id in MEMBERS {
            let role = match id {
                1 => "primary",
                WITNESS => "witness",
                _ => "standby",
            };
            let text = format!(
                "node_id = {id}\nrole = \"{role}\"\ndata_dir = \"data/n{id}\"\ncluster_state = \"new\"\n\
                 transport = \"{transport}\"\n\n[listen]\npeer = \"{peer}\"\napi = \"{api}\"\n\n\
                 [tls]\nca = \"certs/ca.pem\"\ncert = \"certs/node-{id}.pem\"\nkey = \"certs/node-{id}-key.pem\"\n\n\
                 [replication]\ncommit_mode = \"{mode}\"\nheartbeat_interval = \"50ms\"\nfailover_timeout = \"500ms\"\n{extra}\n\n\
                 [admin]\ntoken = \"{token}\"\n\n[log]\nlevel = \"info\"\nformat = \"json\"\n\n{sections}\n\n{members}",
                peer = peers[&id],
                api = apis[&id],
                mode = opts.commit_mode,
                extra = opts.replication_extra,
                sections = opts.sections_extra,
            );
            fs::write(dir.path().join(format!("node-{id}.toml")), text)
                .map_err(|e| format!("config: {e}"))?;
        }
        let apis = apis
            .into_iter()
            .map(|(id, a)| (id, format!("http://{a}")))
            .collect();
        Ok(LocalCluster {
            exe: exe.to_path_buf(),
            dir: Some(dir),
            apis,
            children: BTreeMap::new(),
            pids: Arc::new(Mutex::new(BTreeMap::new())),
            client: Client::new(Duration::from_secs(3), Some(token.clone())),
            token,
        })
    }

    /// The directory holding everything.
    pub fn dir(&self) -> &Path {
        self.dir
            .as_ref()
            .map_or(Path::new("/nonexistent"), |d| d.path())
    }

    /// Member `id`'s config file.
    pub fn config(&self, id: u64) -> PathBuf {
        self.dir().join(format!("node-{id}.toml"))
    }

    /// Member `id`'s log file (its stdout and stderr).
    pub fn log(&self, id: u64) -> PathBuf {
        self.dir().join(format!("node-{id}.log"))
    }

    /// Member `id`'s API URL.
    pub fn api(&self, id: u64) -> &str {
        self.apis
            .get(&id)
            .map_or("http://127.0.0.1:1", String::as_str)
    }

    /// The running members' pids (shared, for a signal handler).
    pub fn pids(&self) -> Pids {
        self.pids.clone()
    }

    /// A client with the admin token.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Starts member `id` (`ha-node run`), its output appended to its log.
    pub fn start(&mut self, id: u64) -> Result<(), String> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log(id))
            .map_err(|e| format!("log file: {e}"))?;
        let err = log.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new(&self.exe)
            .arg("run")
            .arg("--config")
            .arg(self.config(id))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("starting node {id}: {e}"))?;
        if let Ok(mut p) = self.pids.lock() {
            p.insert(id, child.id());
        }
        self.children.insert(id, child);
        Ok(())
    }

    /// Starts every member.
    pub fn start_all(&mut self) -> Result<(), String> {
        for id in MEMBERS {
            self.start(id)?;
        }
        Ok(())
    }

    /// Member `id`'s pid, if running.
    pub fn pid(&self, id: u64) -> Option<u32> {
        self.children.get(&id).map(Child::id)
    }

    /// SIGKILLs member `id` and reaps it.
    pub fn kill(&mut self, id: u64) {
        if let Some(mut c) = self.children.remove(&id) {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Ok(mut p) = self.pids.lock() {
            p.remove(&id);
        }
    }

    /// SIGTERMs member `id` and waits (up to `limit`) for it to exit; its exit
    /// status, or `None` if it had to be killed.
    pub fn terminate(&mut self, id: u64, limit: Duration) -> Option<std::process::ExitStatus> {
        let mut c = self.children.remove(&id)?;
        if let Ok(mut p) = self.pids.lock() {
            p.remove(&id);
        }
        sigterm(c.id());
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Member `id`'s status, if it answers.
    pub fn status(&self, id: u64) -> Result<StatusJson, String> {
        self.client.status(self.api(id))
    }

    /// Waits (up to `limit`) for a data member to be a writable primary;
    /// returns its status and the other data member's id (the standby).
    pub fn wait_for_primary(&self, limit: Duration) -> Result<(StatusJson, u64), String> {
        let primary = self.wait_for(&[1, 2], limit, "a writable primary", |s| s.writable)?;
        let standby = if primary.node_id == 1 { 2 } else { 1 };
        Ok((primary, standby))
    }

    /// Polls members' statuses (every 20 ms, up to `limit`) until `pred`
    /// holds for one; returns it.
    pub fn wait_for(
        &self,
        ids: &[u64],
        limit: Duration,
        what: &str,
        pred: impl Fn(&StatusJson) -> bool,
    ) -> Result<StatusJson, String> {
        let deadline = Instant::now() + limit;
        let mut last = BTreeMap::new();
        loop {
            for id in ids {
                match self.status(*id) {
                    Ok(s) if pred(&s) => return Ok(s),
                    other => {
                        last.insert(*id, other);
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(format!("timed out waiting for {what}: {last:?}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Resident memory of member `id`, in bytes (Linux `/proc`).
    pub fn rss(&self, id: u64) -> Option<u64> {
        self.proc_status_bytes(id, "VmRSS:")
    }

    /// The part of member `id`'s resident memory that is its own (anonymous
    /// pages: heap and stacks), in bytes; the rest is file pages such as the
    /// binary's code, shared by every process of it.
    pub fn private_rss(&self, id: u64) -> Option<u64> {
        self.proc_status_bytes(id, "RssAnon:")
    }

    /// The most resident memory member `id`'s process has had, in bytes.
    pub fn peak_rss(&self, id: u64) -> Option<u64> {
        self.proc_status_bytes(id, "VmHWM:")
    }

    fn proc_status_bytes(&self, id: u64, field: &str) -> Option<u64> {
        let pid = self.pid(id)?;
        let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
    }

    /// Stops every member (SIGTERM, then SIGKILL after a bound) and removes the
    /// directory, unless `keep` (then its path is returned).
    pub fn teardown(&mut self, keep: bool) -> Option<PathBuf> {
        let ids: Vec<u64> = self.children.keys().copied().collect();
        for id in ids {
            self.terminate(id, Duration::from_secs(5));
        }
        let dir = self.dir.take()?;
        if keep {
            Some(dir.keep())
        } else {
            None
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for (_, mut c) in std::mem::take(&mut self.children) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Sends SIGTERM to `pid`.
pub fn sigterm(pid: u32) {
    if let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
}

/// Sends SIGKILL to `pid`.
pub fn sigkill(pid: u32) {
    if let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
    }
}

/// What a Ctrl-C handler needs to clean up after a [`LocalCluster`]: its
/// members' pids and its directory.
pub type CleanupSlot = Arc<Mutex<Option<(Pids, PathBuf)>>>;

/// Stops what `slot` names and removes its directory (a Ctrl-C handler's job).
pub fn clean_up(slot: &CleanupSlot) {
    if let Ok(s) = slot.lock() {
        if let Some((pids, dir)) = s.as_ref() {
            if let Ok(p) = pids.lock() {
                for pid in p.values() {
                    sigkill(*pid);
                }
            }
            let _ = fs::remove_dir_all(dir);
        }
    }
}
