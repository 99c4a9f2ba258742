//! The node's TOML config file ([`NodeFile`]) and its checks.
//!
//! Parsing refuses unknown keys and bad values with the key and the line the
//! parser gives; [`NodeFile::check`] then refuses an inconsistent file (this
//! node not among the members, duplicate ids, a role that does not match the
//! member's kind, an admin token given twice or not at all, ...) naming the key,
//! and builds the replication [`Config`] (whose own checks are reported under
//! the file's key names too).

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ha_core::{CommitMode, Config, ConfiguredRole, Member, MemberKind, NodeId};
use ha_wal::Retention;
use serde::Deserialize;

/// Why a config file was refused: the key (a dotted path, as in the file) and
/// what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigFileError {
    /// The file, if known.
    pub file: Option<PathBuf>,
    /// The key, as a dotted path (`members[2].id`), or empty for the file.
    pub key: String,
    /// What is wrong (for parse errors, the parser's message with its line).
    pub reason: String,
}

impl fmt::Display for ConfigFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{}: ", file.display())?;
        }
        if self.key.is_empty() {
            write!(f, "{}", self.reason)
        } else {
            write!(f, "`{}`: {}", self.key, self.reason)
        }
    }
}

impl std::error::Error for ConfigFileError {}

fn bad(key: impl Into<String>, reason: impl Into<String>) -> ConfigFileError {
    ConfigFileError {
        file: None,
        key: key.into(),
        reason: reason.into(),
    }
}

/// Where this node starts (only a starting point: after a failover a restarted
/// old primary follows the persisted term and rejoins as standby).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// The data node expected to lead at first start.
    Primary,
    /// The data node expected to follow.
    Standby,
    /// The witness: a voter that keeps only its hard state.
    Witness,
}

/// What a member is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// Holds the log and the key-value store.
    Data,
    /// Votes and records floors, holds no data.
    Witness,
}

/// Which network transport peers talk over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum TransportKind {
    /// Mutual-TLS QUIC over UDP (the default).
    #[default]
    Quic,
    /// Mutual-TLS TCP, for networks without UDP.
    Tcp,
}

/// The cluster's state at this node's first start, as etcd's
/// `initial-cluster-state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClusterState {
    /// A new cluster: an empty data directory bootstraps it.
    New,
    /// An existing cluster: an empty data directory joins it as a non-voter.
    Existing,
}

/// How far a write travels before it is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum CommitModeName {
    /// After the primary's own fsync (bounded loss on failover).
    Async,
    /// After both data nodes' fsync (the default).
    #[default]
    Sync,
    /// As sync, and applied on the standby.
    SyncApply,
}

/// Listen or advertise addresses.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Addresses {
    /// Peer traffic (`host:port`).
    pub peer: String,
    /// The HTTP API (listen: `host:port`; advertise: a URL).
    pub api: String,
}

/// A member of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberEntry {
    /// Its node id.
    pub id: u64,
    /// Its peer address (`host:port`).
    pub peer: String,
    /// Its HTTP API URL.
    pub api: String,
    /// Data node or witness.
    pub kind: Kind,
}

/// Certificate paths.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The cluster CA certificate.
    pub ca: PathBuf,
    /// This node's certificate.
    pub cert: PathBuf,
    /// This node's private key.
    pub key: PathBuf,
}

/// Replication tuning; every field has a default.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Replication {
    /// `async`, `sync` or `sync-apply`.
    #[serde(default)]
    pub commit_mode: CommitModeName,
    /// Sync modes: never commit without the standby.
    #[serde(default)]
    pub strict: bool,
    /// Async mode: acknowledged entries a failover may lose.
    pub max_lag_on_failover: Option<u64>,
    /// Whether a standby takes over by itself when the primary is gone.
    pub auto_failover: Option<bool>,
    /// How often the primary heartbeats (`"50ms"`).
    #[serde(default, with = "humantime_serde")]
    pub heartbeat_interval: Option<Duration>,
    /// How long a standby waits before it runs for primary.
    #[serde(default, with = "humantime_serde")]
    pub failover_timeout: Option<Duration>,
    /// The random extra on top of `failover_timeout`.
    #[serde(default, with = "humantime_serde")]
    pub failover_jitter: Option<Duration>,
    /// Bound on one peer call.
    #[serde(default, with = "humantime_serde")]
    pub rpc_timeout: Option<Duration>,
    /// How long the primary waits for the standby before degrading to the
    /// witness's floor.
    #[serde(default, with = "humantime_serde")]
    pub degrade_timeout: Option<Duration>,
    /// Entries between snapshots.
    pub snapshot_every: Option<u64>,
}

/// How much write-ahead log a primary keeps behind its snapshot for a lagging
/// standby (served from the log instead of a full snapshot); every field has
/// ha-wal's default.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct WalSection {
    /// Keep at least this many of the latest entries (default 10000).
    pub keep_entries: Option<u64>,
    /// Keep at least this many bytes of the latest entries (default 64 MiB).
    pub keep_bytes: Option<u64>,
    /// Keep at most this many entries for a lagging standby (default 1000000).
    pub max_entries: Option<u64>,
    /// Keep at most this many bytes for a lagging standby (default 4 GiB).
    pub max_bytes: Option<u64>,
}

impl WalSection {
    /// The retention policy, refused (naming the key) if a minimum exceeds its
    /// maximum.
    pub fn retention(&self) -> Result<Retention, ConfigFileError> {
        let d = Retention::default();
        let r = Retention {
            keep_entries: self.keep_entries.unwrap_or(d.keep_entries),
            keep_bytes: self.keep_bytes.unwrap_or(d.keep_bytes),
            max_entries: self.max_entries.unwrap_or(d.max_entries),
            max_bytes: self.max_bytes.unwrap_or(d.max_bytes),
        };
        if r.keep_entries > r.max_entries {
            return Err(bad("wal.keep_entries", "must not exceed wal.max_entries"));
        }
        if r.keep_bytes > r.max_bytes {
            return Err(bad("wal.keep_bytes", "must not exceed wal.max_bytes"));
        }
        Ok(r)
    }
}

/// The admin token: inline or in a file (exactly one).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    /// The token itself.
    pub token: Option<String>,
    /// A file holding the token (surrounding whitespace ignored).
    pub token_file: Option<PathBuf>,
}

/// Log settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Log {
    /// `error`, `warn`, `info`, `debug` or `trace` (`RUST_LOG` overrides it).
    #[serde(default = "default_level")]
    pub level: String,
    /// `text` or `json`.
    #[serde(default = "default_format")]
    pub format: String,
}

impl Default for Log {
    fn default() -> Self {
        Log {
            level: default_level(),
            format: default_format(),
        }
    }
}

fn default_level() -> String {
    "info".into()
}

fn default_format() -> String {
    "text".into()
}

/// One node's config file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeFile {
    /// This node's id (it must be among `members`).
    pub node_id: u64,
    /// Where this node starts: `primary`, `standby` or `witness`.
    pub role: Role,
    /// The data directory (WAL, store, hard state).
    pub data_dir: PathBuf,
    /// `new` (bootstrap) or `existing` (join).
    pub cluster_state: ClusterState,
    /// `quic` or `tcp`.
    #[serde(default)]
    pub transport: TransportKind,
    /// Where to listen.
    pub listen: Addresses,
    /// Where others reach this node (default: the listen addresses).
    pub advertise: Option<Addresses>,
    /// Certificates.
    pub tls: TlsFiles,
    /// Replication tuning.
    #[serde(default)]
    pub replication: Replication,
    /// Write-ahead log retention.
    #[serde(default)]
    pub wal: WalSection,
    /// The admin token.
    #[serde(default)]
    pub admin: Admin,
    /// Logging.
    #[serde(default)]
    pub log: Log,
    /// Every member, this node included.
    pub members: Vec<MemberEntry>,
}

/// A checked config file: the replication config and what the node binary
/// needs besides.
#[derive(Debug, Clone)]
pub struct Checked {
    /// The file as parsed.
    pub file: NodeFile,
    /// The replication config (valid).
    pub config: Config,
    /// The admin token.
    pub admin_token: String,
    /// The HTTP API listen address.
    pub api_listen: SocketAddr,
}

fn check_host_port(key: &str, value: &str) -> Result<(), ConfigFileError> {
    match value.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(()),
        _ => Err(bad(key, format!("{value:?} is not host:port"))),
    }
}

fn check_url(key: &str, value: &str) -> Result<(), ConfigFileError> {
    let rest = value
        .strip_prefix("http://")
        .or_else(|| value.strip_prefix("https://"))
        .ok_or_else(|| bad(key, format!("{value:?} is not an http:// or https:// URL")))?;
    let host_port = rest.split('/').next().unwrap_or_default();
    check_host_port(key, host_port)
}

impl NodeFile {
    /// Parses a config file's text; unknown keys and bad values are refused
    /// with the parser's message (key and line).
    pub fn parse(text: &str) -> Result<Self, ConfigFileError> {
        // The parser's message names the key and the line (and refuses
        // unknown keys: every table denies them).
        toml::from_str(text).map_err(|e| bad("", e.to_string().trim_end()))
    }

    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigFileError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigFileError {
            file: Some(path.to_path_buf()),
            key: String::new(),
            reason: format!("cannot read the config file: {e}"),
        })?;
        Self::parse(&text).map_err(|e| ConfigFileError {
            file: Some(path.to_path_buf()),
            ..e
        })
    }

    /// Checks the file for consistency and builds the replication config.
    /// Relative paths (data dir, certificates, token file) are resolved
    /// against `base` (the config file's directory).
    pub fn check(mut self, base: &Path) -> Result<Checked, ConfigFileError> {
        self.wal.retention()?;
        for p in [
            &mut self.data_dir,
            &mut self.tls.ca,
            &mut self.tls.cert,
            &mut self.tls.key,
        ] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        if let Some(f) = self.admin.token_file.as_mut() {
            if f.is_relative() {
                *f = base.join(&*f);
            }
        }
        let mut ids = BTreeSet::new();
        for (i, m) in self.members.iter().enumerate() {
            if !ids.insert(m.id) {
                return Err(bad(
                    format!("members[{i}].id"),
                    format!("node {} is listed twice", m.id),
                ));
            }
            check_host_port(&format!("members[{i}].peer"), &m.peer)?;
            check_url(&format!("members[{i}].api"), &m.api)?;
        }
        let data = self.members.iter().filter(|m| m.kind == Kind::Data).count();
        let witnesses = self.members.len() - data;
        if data != 2 {
            return Err(bad(
                "members",
                format!("a cluster has exactly two data members, this one lists {data}"),
            ));
        }
        if witnesses > 1 {
            return Err(bad(
                "members",
                format!("a cluster has at most one witness, this one lists {witnesses}"),
            ));
        }
        let me = self
            .members
            .iter()
            .find(|m| m.id == self.node_id)
            .ok_or_else(|| {
                bad(
                    "node_id",
                    format!("node {} is not among `members`", self.node_id),
                )
            })?
            .clone();
        let expected = match self.role {
            Role::Witness => Kind::Witness,
            Role::Primary | Role::Standby => Kind::Data,
        };
        if me.kind != expected {
            return Err(bad(
                "role",
                format!(
                    "role {:?} does not match this node's member kind {:?}",
                    self.role, me.kind
                ),
            ));
        }
        check_host_port("listen.peer", &self.listen.peer)?;
        let api_listen: SocketAddr = self.listen.api.parse().map_err(|e| {
            bad(
                "listen.api",
                format!("{:?} is not ip:port: {e}", self.listen.api),
            )
        })?;
        let advertise = self.advertise.clone().unwrap_or_else(|| Addresses {
            peer: self.listen.peer.clone(),
            api: format!("http://{}", self.listen.api),
        });
        check_host_port("advertise.peer", &advertise.peer)?;
        check_url("advertise.api", &advertise.api)?;
        if advertise.peer != me.peer {
            return Err(bad(
                "advertise.peer",
                format!(
                    "{:?} differs from this node's entry in `members` ({:?})",
                    advertise.peer, me.peer
                ),
            ));
        }
        if !matches!(
            self.log.level.as_str(),
            "error" | "warn" | "info" | "debug" | "trace"
        ) {
            return Err(bad(
                "log.level",
                format!(
                    "{:?} is not error, warn, info, debug or trace",
                    self.log.level
                ),
            ));
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return Err(bad(
                "log.format",
                format!("{:?} is not text or json", self.log.format),
            ));
        }
        let admin_token = match (&self.admin.token, &self.admin.token_file) {
            (Some(_), Some(_)) => {
                return Err(bad("admin", "give `token` or `token_file`, not both"))
            }
            (None, None) => {
                return Err(bad(
                    "admin",
                    "an admin token is required (`token` or `token_file`)",
                ))
            }
            (Some(t), None) => t.clone(),
            (None, Some(f)) => std::fs::read_to_string(f)
                .map_err(|e| {
                    bad(
                        "admin.token_file",
                        format!("cannot read {}: {e}", f.display()),
                    )
                })?
                .trim()
                .to_string(),
        };
        if admin_token.len() < 16 {
            return Err(bad(
                "admin",
                "the admin token must be at least 16 characters",
            ));
        }
        let config = self.replication_config(&me)?;
        Ok(Checked {
            file: self,
            config,
            admin_token,
            api_listen,
        })
    }

    fn replication_config(&self, me: &MemberEntry) -> Result<Config, ConfigFileError> {
        let kind = |k: Kind| match k {
            Kind::Data => MemberKind::Data,
            Kind::Witness => MemberKind::Witness,
        };
        let peers = self
            .members
            .iter()
            .filter(|m| m.id != self.node_id)
            .map(|m| Member {
                id: NodeId(m.id),
                addr: m.peer.clone(),
                kind: kind(m.kind),
            })
            .collect();
        let mut c = Config::new(
            NodeId(self.node_id),
            kind(me.kind),
            self.listen.peer.clone(),
            peers,
        );
        c.role = match self.role {
            Role::Primary => ConfiguredRole::Primary,
            Role::Standby => ConfiguredRole::Standby,
            Role::Witness => ConfiguredRole::Witness,
        };
        c.advertise_addr = me.peer.clone();
        let r = &self.replication;
        c.commit_mode = match r.commit_mode {
            CommitModeName::Async => CommitMode::Async,
            CommitModeName::Sync => CommitMode::Sync,
            CommitModeName::SyncApply => CommitMode::SyncApply,
        };
        c.strict_sync = r.strict;
        c.max_lag_on_failover = r.max_lag_on_failover;
        if let Some(v) = r.auto_failover {
            c.auto_failover = v;
        }
        if let Some(v) = r.heartbeat_interval {
            c.heartbeat_interval = v;
        }
        if let Some(v) = r.failover_timeout {
            c.failover_timeout = v;
        }
        if let Some(v) = r.failover_jitter {
            c.failover_jitter = v;
        }
        if let Some(v) = r.rpc_timeout {
            c.rpc_timeout = v;
        }
        if let Some(v) = r.degrade_timeout {
            c.degrade_timeout = v;
        }
        if let Some(v) = r.snapshot_every {
            c.snapshot_every = v;
        }
        c.validate()
            .map_err(|e| bad(file_key(e.field), e.reason.clone()))?;
        Ok(c)
    }
}

/// The file's key for a field of the replication [`Config`].
fn file_key(field: &str) -> String {
    match field {
        "strict_sync" => "replication.strict".into(),
        "commit_mode"
        | "max_lag_on_failover"
        | "auto_failover"
        | "heartbeat_interval"
        | "failover_timeout"
        | "failover_jitter"
        | "rpc_timeout"
        | "degrade_timeout"
        | "snapshot_every" => format!("replication.{field}"),
        "peers" => "members".into(),
        "bind_addr" => "listen.peer".into(),
        "advertise_addr" => "advertise.peer".into(),
        "node_id" | "kind" | "role" => field.into(),
        // Tuning the file does not expose: the defaults it derives from.
        other => format!("replication (derived {other})"),
    }
}

/// The config file's name of a commit mode.
pub fn commit_mode_name(mode: CommitMode) -> &'static str {
    match mode {
        CommitMode::Async => "async",
        CommitMode::Sync => "sync",
        CommitMode::SyncApply => "sync-apply",
    }
}
