//! The HTTP API (axum): key-value reads and writes, status, load-balancer
//! health checks and the admin calls.
//!
//! Writes answer `200` only once committed under the commit mode; a write whose
//! outcome is unknown answers `503 indeterminate`, never a false success or
//! failure (docs/api.md has every answer).

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use base64::Engine as _;
use ha_core::{
    Command, Error, HealthStatus, LogStore, MemberKind, Node, NodeId, PromoteOptions,
    ReadConsistency, Replicator, Role, StateMachine, Transport, WriteAck,
};
use serde::Deserialize;
use serde_json::json;

use crate::admin;
use crate::events::EventLog;
use crate::json::{ItemJson, ListJson, PeerJson, StatusJson, WriteJson};
use crate::kv::{
    Item, KvAnswer, KvCommand, KvOutput, KvQuery, MAX_KEY_BYTES, MAX_LIST_LIMIT, MAX_VALUE_BYTES,
};
use crate::metrics::{ApiMetrics, Exporter};

/// A boxed future, for the object-safe [`NodeApi`].
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the API needs of a running node, whatever its transport and stores.
pub trait NodeApi: Send + Sync + 'static {
    /// The node's replication state.
    fn status(&self) -> HealthStatus;
    /// Replicates a command.
    fn write(&self, command: Vec<u8>, timeout: Duration) -> BoxFuture<'_, Result<WriteAck, Error>>;
    /// Reads from the state machine.
    fn read(
        &self,
        query: Vec<u8>,
        consistency: ReadConsistency,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<Vec<u8>, Error>>;
    /// Asks this node to become primary.
    fn promote(&self, force: bool) -> BoxFuture<'_, Result<(), Error>>;
    /// Hands over from this primary to the standby.
    fn switchover(&self, timeout: Duration) -> BoxFuture<'_, Result<(), Error>>;
    /// Pauses (true) or resumes automatic failover on this node.
    fn set_failover_paused(&self, paused: bool);
    /// The node's counters and histograms.
    fn metrics(&self) -> ha_core::driver::Metrics;
    /// Every cluster event from now on.
    fn subscribe_observations(
        &self,
    ) -> tokio::sync::broadcast::Receiver<ha_core::observe::Observed>;
}

impl<T: Transport, L: LogStore, S: StateMachine> NodeApi for Node<T, L, S> {
    fn status(&self) -> HealthStatus {
        Node::status(self)
    }

    fn write(&self, command: Vec<u8>, timeout: Duration) -> BoxFuture<'_, Result<WriteAck, Error>> {
        Box::pin(self.apply(Command(command), timeout))
    }

    fn read(
        &self,
        query: Vec<u8>,
        consistency: ReadConsistency,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<Vec<u8>, Error>> {
        Box::pin(Replicator::read(self, query, consistency, timeout))
    }

    fn promote(&self, force: bool) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(Replicator::promote(
            self,
            PromoteOptions {
                force_without_quorum_may_lose_data: force,
            },
        ))
    }

    fn switchover(&self, timeout: Duration) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(Replicator::switchover(self, timeout))
    }

    fn metrics(&self) -> ha_core::driver::Metrics {
        Node::metrics(self)
    }

    fn subscribe_observations(
        &self,
    ) -> tokio::sync::broadcast::Receiver<ha_core::observe::Observed> {
        Node::subscribe_observations(self)
    }

    fn set_failover_paused(&self, paused: bool) {
        if paused {
            self.pause_auto_failover()
        } else {
            self.resume_auto_failover()
        }
    }
}

/// One member as the API names it.
#[derive(Clone, Debug)]
pub struct MemberApi {
    /// Data node or witness.
    pub kind: MemberKind,
    /// Its API URL.
    pub api: String,
}

/// What the handlers share.
pub struct ApiState {
    /// The node.
    pub node: Arc<dyn NodeApi>,
    /// The admin bearer token.
    pub admin_token: String,
    /// Every member (this node too) by id.
    pub members: BTreeMap<NodeId, MemberApi>,
    /// How long a write or read may wait.
    pub request_timeout: Duration,
    /// Calls the other members' APIs (pause/resume fan-out).
    pub client: crate::client::Client,
    /// The API's own metrics.
    pub metrics: Arc<ApiMetrics>,
    /// `GET /metrics`.
    pub exporter: Exporter,
    /// The event history.
    pub events: Arc<EventLog>,
    /// The rate of WARN lines for refused admin calls (a client retrying with
    /// a wrong token must not flood the log).
    pub refusal_lines: ha_core::ratelimit::Burst,
}

impl ApiState {
    pub(crate) fn me(&self) -> NodeId {
        self.node.status().node_id
    }

    fn is_witness(&self) -> bool {
        self.members
            .get(&self.me())
            .is_some_and(|m| m.kind == MemberKind::Witness)
    }

    pub(crate) fn api_of(&self, id: Option<NodeId>) -> Option<String> {
        id.and_then(|id| self.members.get(&id))
            .map(|m| m.api.clone())
    }

    /// `GET /v1/status`'s body.
    pub fn status_json(&self) -> StatusJson {
        let s = self.node.status();
        let kind = |k: MemberKind| match k {
            MemberKind::Data => "data",
            MemberKind::Witness => "witness",
        };
        StatusJson {
            node_id: s.node_id.0,
            kind: kind(if self.is_witness() {
                MemberKind::Witness
            } else {
                MemberKind::Data
            })
            .into(),
            role: s.role.to_string(),
            term: s.term.number,
            term_node: s.term.node.0,
            leader_id: s.leader.map(|l| l.0),
            leader_api: self.api_of(s.leader),
            writable: s.writable,
            lease_remaining_ms: s
                .lease_remaining
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            commit_index: s.commit_index.0,
            applied_index: s.applied_index.0,
            last_index: s.last_position.index.0,
            lag: s.lag,
            commit_mode: crate::config::commit_mode_name(s.commit_mode).into(),
            degraded: s.degraded,
            failover_paused: s.failover_paused,
            running: s.running,
            peers: s
                .peers
                .iter()
                .map(|p| PeerJson {
                    id: p.id.0,
                    address: p.addr.clone(),
                    api: self.api_of(Some(p.id)),
                    kind: kind(p.kind).into(),
                    healthy: p.healthy,
                    last_contact_ms: p
                        .last_contact
                        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                    match_index: p.match_index.map(|m| m.0),
                })
                .collect(),
        }
    }
}

pub(crate) type Shared = Arc<ApiState>;

/// The API's routes.
pub fn router(state: Shared) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/primary", get(primary))
        .route("/standby", get(standby))
        .route("/v1/status", get(status))
        .route("/metrics", get(metrics))
        .route("/v1/events", get(events))
        .route("/v1/kv", get(list))
        .route("/v1/kv/", get(list))
        .route(
            "/v1/kv/{*key}",
            put(put_key).get(get_key).delete(delete_key),
        )
        .route("/v1/admin/promote", post(admin::promote))
        .route("/v1/admin/switchover", post(admin::switchover))
        .route("/v1/admin/pause-failover", post(admin::pause))
        .route("/v1/admin/resume-failover", post(admin::resume))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not_found", "no such endpoint") })
        // The value limit: by the announced length before reading anything, and
        // while reading a body that announced none.
        .layer(DefaultBodyLimit::max(MAX_VALUE_BYTES))
        .layer(axum::middleware::from_fn(refuse_oversized))
        .with_state(state)
}

/// Answers `413` at once for a body announced over the limit.
async fn refuse_oversized(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let announced = req
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > MAX_VALUE_BYTES as u64) {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("values are at most {MAX_VALUE_BYTES} bytes"),
        );
    }
    next.run(req).await
}

pub(crate) fn error(code: StatusCode, error: &str, detail: impl Into<String>) -> Response {
    (code, Json(json!({"error": error, "detail": detail.into()}))).into_response()
}

pub(crate) fn not_primary(state: &ApiState, leader: Option<NodeId>) -> Response {
    let leader = leader.or(state.node.status().leader);
    // A witness or a standby never names itself.
    let leader = leader.filter(|l| *l != state.me());
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({
            "error": "not_primary",
            "primary": state.api_of(leader),
            "primary_id": leader.map(|l| l.0),
        })),
    )
        .into_response()
}

/// A failed write or linearizable read, mapped to its answer. `taken`: the
/// request may have reached the log (a write), so a timeout or step-down leaves
/// its outcome unknown.
/// The `error` code [`failure`] answers `e` with (the outcome label of the
/// metrics).
fn error_code(e: &Error, taken: bool) -> &'static str {
    match e {
        Error::NotLeader { .. } | Error::StandbyMode | Error::NotReady => "not_primary",
        Error::Busy { .. } => "busy",
        Error::Timeout | Error::Fenced { .. } | Error::Closed if taken => "indeterminate",
        Error::Timeout => "timeout",
        Error::Fenced { .. } => "not_primary",
        Error::Closed => "shutting_down",
        _ => "internal",
    }
}

fn failure(state: &ApiState, e: Error, taken: bool) -> Response {
    match e {
        Error::NotLeader { leader, .. } => not_primary(state, leader),
        Error::StandbyMode | Error::NotReady => not_primary(state, None),
        Error::Busy { waiting } => {
            let mut r = (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"error": "busy", "waiting": waiting})),
            )
                .into_response();
            r.headers_mut()
                .insert("retry-after", HeaderValue::from_static("1"));
            r
        }
        Error::Timeout | Error::Fenced { .. } | Error::Closed if taken => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "indeterminate",
            format!("the write's outcome is unknown ({e}); read the key before retrying"),
        ),
        Error::Timeout => error(StatusCode::SERVICE_UNAVAILABLE, "timeout", e.to_string()),
        Error::Fenced { .. } => not_primary(state, None),
        Error::Closed => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            e.to_string(),
        ),
        other => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            other.to_string(),
        ),
    }
}

async fn health(State(s): State<Shared>) -> Response {
    let st = s.node.status();
    let code = if st.running {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        Json(json!({"status": if st.running {"ok"} else {"stopped"}, "role": st.role.to_string()})),
    )
        .into_response()
}

async fn primary(State(s): State<Shared>) -> Response {
    let st = s.node.status();
    if st.running && st.writable {
        (
            StatusCode::OK,
            Json(json!({"primary": true, "term": st.term.number})),
        )
            .into_response()
    } else {
        not_primary(&s, st.leader)
    }
}

#[derive(Deserialize)]
struct StandbyParams {
    max_lag: Option<u64>,
}

async fn standby(State(s): State<Shared>, Query(p): Query<StandbyParams>) -> Response {
    let st = s.node.status();
    let leader_healthy = st
        .leader
        .and_then(|l| st.peers.iter().find(|p| p.id == l))
        .is_some_and(|p| p.healthy);
    let lag_ok = p.max_lag.is_none_or(|m| st.lag <= m);
    let ok = st.running && st.role == Role::Standby && leader_healthy && lag_ok;
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        Json(json!({"standby": ok, "role": st.role.to_string(), "lag": st.lag})),
    )
        .into_response()
}

async fn status(State(s): State<Shared>) -> Response {
    Json(s.status_json()).into_response()
}

async fn metrics(State(s): State<Shared>) -> Response {
    match s.exporter.render() {
        Ok(text) => (
            StatusCode::OK,
            [("content-type", crate::metrics::CONTENT_TYPE)],
            text,
        )
            .into_response(),
        Err(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the metrics could not be encoded",
        ),
    }
}

/// At most this many events per answer.
const MAX_EVENTS: usize = 1000;

#[derive(Deserialize)]
struct EventParams {
    #[serde(default)]
    since: u64,
    limit: Option<usize>,
    /// With nothing after `since`: wait up to this long for the next event.
    wait_ms: Option<u64>,
}

/// The longest an events request may wait for the next event (well within the
/// HTTP server's 30 s request bound). A stopping node records its stop, which
/// ends every wait before the server drains.
const MAX_EVENTS_WAIT: Duration = Duration::from_secs(4);

async fn events(State(s): State<Shared>, Query(p): Query<EventParams>) -> Response {
    let limit = p.limit.unwrap_or(MAX_EVENTS);
    if limit == 0 || limit > MAX_EVENTS {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_limit",
            format!("limit is 1 to {MAX_EVENTS}"),
        );
    }
    let wait = Duration::from_millis(p.wait_ms.unwrap_or(0));
    if wait > MAX_EVENTS_WAIT {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_wait",
            format!("wait_ms is at most {}", MAX_EVENTS_WAIT.as_millis()),
        );
    }
    if !wait.is_zero() {
        // Subscribed before looking, so an event between the two is not missed.
        let mut newest = s.events.subscribe();
        let since = p.since;
        let _ = tokio::time::timeout(wait, newest.wait_for(|n| *n > since)).await;
    }
    let events = s.events.since(p.since, limit);
    let next = events.last().map_or(p.since, |e| e.seq);
    Json(json!({
        "events": events,
        "next_since": next,
        "oldest": s.events.oldest(),
    }))
    .into_response()
}

#[derive(Deserialize)]
struct WriteParams {
    if_mod_index: Option<u64>,
}

/// The answer refusing `key`, if it is refused.
fn check_key(key: &str) -> Option<Response> {
    if key.is_empty() {
        return Some(error(
            StatusCode::BAD_REQUEST,
            "bad_key",
            "the key is empty",
        ));
    }
    if key.len() > MAX_KEY_BYTES {
        return Some(error(
            StatusCode::URI_TOO_LONG,
            "key_too_long",
            format!("keys are at most {MAX_KEY_BYTES} bytes"),
        ));
    }
    None
}

async fn write(s: Shared, cmd: KvCommand) -> Response {
    let began = std::time::Instant::now();
    let (outcome, response) = write_answer(&s, cmd).await;
    s.metrics.write_done(outcome, began.elapsed());
    response
}

/// A write's answer and its outcome label.
async fn write_answer(s: &ApiState, cmd: KvCommand) -> (&'static str, Response) {
    if s.is_witness() {
        return ("not_primary", not_primary(s, None));
    }
    let st = s.node.status();
    if !st.writable {
        return ("not_primary", not_primary(s, st.leader));
    }
    match s.node.write(cmd.encode(), s.request_timeout).await {
        Err(e) => (error_code(&e, true), failure(s, e, true)),
        Ok(ack) => match KvOutput::decode(&ack.output) {
            Ok(KvOutput::Done { .. }) => (
                "acked",
                Json(WriteJson {
                    index: ack.position.index.0,
                    term: ack.term.number,
                })
                .into_response(),
            ),
            Ok(KvOutput::Mismatch { current }) => (
                "mismatch",
                (
                    StatusCode::PRECONDITION_FAILED,
                    Json(json!({
                        "error": "mod_index_mismatch",
                        "mod_index": current,
                        "index": ack.position.index.0,
                    })),
                )
                    .into_response(),
            ),
            Ok(KvOutput::Invalid(why)) => {
                ("invalid", error(StatusCode::BAD_REQUEST, "invalid", why))
            }
            Err(e) => (
                "internal",
                error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    format!("undecodable output: {e}"),
                ),
            ),
        },
    }
}

async fn put_key(
    State(s): State<Shared>,
    Path(key): Path<String>,
    Query(p): Query<WriteParams>,
    body: Bytes,
) -> Response {
    if let Some(r) = check_key(&key) {
        return r;
    }
    let cmd = KvCommand::Put {
        key: key.into_bytes(),
        value: body.to_vec(),
        if_mod_index: p.if_mod_index,
    };
    write(s, cmd).await
}

async fn delete_key(
    State(s): State<Shared>,
    Path(key): Path<String>,
    Query(p): Query<WriteParams>,
) -> Response {
    if let Some(r) = check_key(&key) {
        return r;
    }
    let cmd = KvCommand::Delete {
        key: key.into_bytes(),
        if_mod_index: p.if_mod_index,
    };
    write(s, cmd).await
}

#[derive(Deserialize)]
struct ReadParams {
    #[serde(default)]
    stale: bool,
}

/// Runs a query with the asked-for consistency, counted by outcome.
async fn query(
    s: &ApiState,
    q: KvQuery,
    stale: bool,
) -> Result<(KvAnswer, HealthStatus), Response> {
    let (outcome, result) = query_answer(s, q, stale).await;
    let consistency = if stale { "stale" } else { "linearizable" };
    s.metrics.read_done(consistency, outcome);
    result
}

async fn query_answer(
    s: &ApiState,
    q: KvQuery,
    stale: bool,
) -> (&'static str, Result<(KvAnswer, HealthStatus), Response>) {
    match query_inner(s, q, stale).await {
        Ok(a) => ("ok", Ok(a)),
        Err((outcome, r)) => (outcome, Err(r)),
    }
}

async fn query_inner(
    s: &ApiState,
    q: KvQuery,
    stale: bool,
) -> Result<(KvAnswer, HealthStatus), (&'static str, Response)> {
    if s.is_witness() {
        return Err((
            "witness",
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "witness",
                "this node is a witness: it holds no data",
            ),
        ));
    }
    let consistency = if stale {
        ReadConsistency::Stale
    } else {
        let st = s.node.status();
        if st.role != Role::Primary {
            return Err(("not_primary", not_primary(s, st.leader)));
        }
        ReadConsistency::Linearizable
    };
    let bytes = s
        .node
        .read(q.encode(), consistency, s.request_timeout)
        .await
        .map_err(|e| (error_code(&e, false), failure(s, e, false)))?;
    let answer = KvAnswer::decode(&bytes).map_err(|e| {
        (
            "internal",
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("undecodable answer: {e}"),
            ),
        )
    })?;
    if let KvAnswer::Invalid(why) = &answer {
        return Err((
            "store",
            error(StatusCode::INTERNAL_SERVER_ERROR, "store", why.clone()),
        ));
    }
    Ok((answer, s.node.status()))
}

async fn get_key(
    State(s): State<Shared>,
    Path(key): Path<String>,
    Query(p): Query<ReadParams>,
) -> Response {
    if let Some(r) = check_key(&key) {
        return r;
    }
    let q = KvQuery::Get {
        key: key.into_bytes(),
    };
    match query(&s, q, p.stale).await {
        Err(r) => r,
        Ok((KvAnswer::Value(Some(item)), st)) => {
            let mut headers = HeaderMap::new();
            headers.insert("x-mod-index", HeaderValue::from(item.mod_index));
            headers.insert("x-term", HeaderValue::from(st.term.number));
            headers.insert(
                "content-type",
                HeaderValue::from_static("application/octet-stream"),
            );
            (StatusCode::OK, headers, item.value).into_response()
        }
        Ok((KvAnswer::Value(None), st)) => {
            let mut r = error(StatusCode::NOT_FOUND, "not_found", "no such key");
            r.headers_mut()
                .insert("x-term", HeaderValue::from(st.term.number));
            r
        }
        Ok(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "wrong answer kind",
        ),
    }
}

#[derive(Deserialize)]
struct ListParams {
    #[serde(default)]
    prefix: String,
    limit: Option<u32>,
    start_after: Option<String>,
    #[serde(default)]
    stale: bool,
}

fn item_json(it: Item) -> ItemJson {
    let b64 = base64::engine::general_purpose::STANDARD;
    let (key, key_base64) = match String::from_utf8(it.key) {
        Ok(k) => (k, None),
        Err(e) => {
            let bytes = e.into_bytes();
            (
                String::from_utf8_lossy(&bytes).into_owned(),
                Some(b64.encode(&bytes)),
            )
        }
    };
    let (value, value_base64) = match String::from_utf8(it.value) {
        Ok(v) => (Some(v), None),
        Err(e) => (None, Some(b64.encode(e.into_bytes()))),
    };
    ItemJson {
        key,
        key_base64,
        value,
        value_base64,
        mod_index: it.mod_index,
    }
}

async fn list(State(s): State<Shared>, Query(p): Query<ListParams>) -> Response {
    let limit = p.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_LIST_LIMIT {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_limit",
            format!("limit is 1 to {MAX_LIST_LIMIT}"),
        );
    }
    if p.prefix.len() > MAX_KEY_BYTES
        || p.start_after
            .as_ref()
            .is_some_and(|a| a.len() > MAX_KEY_BYTES)
    {
        return error(
            StatusCode::URI_TOO_LONG,
            "key_too_long",
            "prefix or start_after too long",
        );
    }
    let q = KvQuery::List {
        prefix: p.prefix.into_bytes(),
        start_after: p
            .start_after
            .map(|a| serde_bytes::ByteBuf::from(a.into_bytes())),
        limit,
    };
    match query(&s, q, p.stale).await {
        Err(r) => r,
        Ok((KvAnswer::List { items, more }, _)) => {
            let items: Vec<ItemJson> = items.into_iter().map(item_json).collect();
            let next_start_after = if more {
                items.last().map(|i| i.key.clone())
            } else {
                None
            };
            Json(ListJson {
                items,
                more,
                next_start_after,
            })
            .into_response()
        }
        Ok(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "wrong answer kind",
        ),
    }
}
