//! The admin endpoints (`/v1/admin/*`): a bearer token compared in constant
//! time, then promote, switchover and the failover pause fanned out to every
//! member.

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use ha_core::{Error, Role};
use serde::Deserialize;
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::api::{error, not_primary, ApiState, Shared};
use crate::events::NodeEvent;
use ha_core::ratelimit::Verdict;

/// The refusal, if any: `401` without a bearer token, `403` with a wrong one (compared in constant
/// time).
pub(crate) fn authorize(s: &ApiState, headers: &HeaderMap, what: &str) -> Option<Response> {
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let (status, code, detail) = match given {
        None => (
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "admin calls need `Authorization: Bearer <admin token>`",
        ),
        Some(t) if bool::from(t.as_bytes().ct_eq(s.admin_token.as_bytes())) => return None,
        Some(_) => (StatusCode::FORBIDDEN, "forbidden", "wrong admin token"),
    };
    s.metrics.admin_refused(code);
    match s.refusal_lines.admit_now() {
        Verdict::Log { suppressed: 0 } => {
            tracing::warn!(
                request = what,
                reason = code,
                "refused an admin request: {detail}"
            )
        }
        Verdict::Log { suppressed } => tracing::warn!(
            request = what,
            reason = code,
            suppressed,
            "refused an admin request: {detail} ({suppressed} similar refusals not logged)"
        ),
        Verdict::Suppress => {
            tracing::debug!(
                request = what,
                reason = code,
                "refused an admin request: {detail}"
            )
        }
    }
    Some(error(status, code, detail))
}

#[derive(Deserialize)]
pub(crate) struct PromoteParams {
    #[serde(default)]
    force: bool,
}

pub(crate) async fn promote(
    State(s): State<Shared>,
    headers: HeaderMap,
    Query(p): Query<PromoteParams>,
) -> Response {
    if let Some(r) = authorize(&s, &headers, "promote") {
        return r;
    }
    tracing::warn!(force = p.force, "promote requested by an operator");
    let result = s.node.promote(p.force).await;
    let request = if p.force {
        "promote --force"
    } else {
        "promote"
    };
    record(&s, request, &result);
    match result {
        Ok(()) => {
            let mut body = json!({"promoted": true, "forced": p.force});
            if p.force {
                body["warning"] = json!(
                    "forced promotion without a quorum: writes the old primary acknowledged may be lost"
                );
            }
            Json(body).into_response()
        }
        Err(e) => error(StatusCode::CONFLICT, "promote_failed", e.to_string()),
    }
}

pub(crate) async fn switchover(State(s): State<Shared>, headers: HeaderMap) -> Response {
    if let Some(r) = authorize(&s, &headers, "switchover") {
        return r;
    }
    let st = s.node.status();
    if st.role != Role::Primary {
        return not_primary(&s, st.leader);
    }
    tracing::info!("switchover requested by an operator");
    let result = s.node.switchover(s.request_timeout).await;
    record(&s, "switchover", &result);
    match result {
        Ok(()) => {
            let st = s.node.status();
            Json(json!({"switched": true, "primary": s.api_of(st.leader), "primary_id": st.leader.map(|l| l.0)}))
                .into_response()
        }
        Err(Error::Timeout) => error(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            "the switchover did not finish in time; check /v1/status",
        ),
        Err(e) => error(StatusCode::CONFLICT, "switchover_failed", e.to_string()),
    }
}

/// Pauses or resumes failover here and, unless the call was itself forwarded,
/// on every other member (a paused primary alone would not stop its standby).
async fn set_paused(s: Shared, headers: HeaderMap, paused: bool) -> Response {
    let what = if paused {
        "pause-failover"
    } else {
        "resume-failover"
    };
    if let Some(r) = authorize(&s, &headers, what) {
        return r;
    }
    s.node.set_failover_paused(paused);
    record(&s, what, &Ok(()));
    tracing::info!(
        paused,
        "failover {} by an operator",
        if paused { "paused" } else { "resumed" }
    );
    let me = s.me();
    let mut done = vec![me.0];
    let mut unreachable = Vec::new();
    if headers.get("x-ha-forwarded").is_none() {
        for (id, m) in s.members.iter().filter(|(id, _)| **id != me) {
            let url = format!("{}/v1/admin/{what}", m.api.trim_end_matches('/'));
            let client = s.client.clone();
            let reply = tokio::task::spawn_blocking(move || client.forward_admin(&url)).await;
            match reply {
                Ok(Ok(200)) => done.push(id.0),
                _ => unreachable.push(id.0),
            }
        }
    }
    Json(json!({"failover_paused": paused, "nodes": done, "unreachable": unreachable}))
        .into_response()
}

pub(crate) async fn pause(State(s): State<Shared>, headers: HeaderMap) -> Response {
    set_paused(s, headers, true).await
}

pub(crate) async fn resume(State(s): State<Shared>, headers: HeaderMap) -> Response {
    set_paused(s, headers, false).await
}

/// Records an operator's request and its result in the event history.
fn record(s: &ApiState, request: &str, result: &Result<(), Error>) {
    s.events.node(NodeEvent::OperatorRequest {
        request: request.into(),
        result: match result {
            Ok(()) => "ok".into(),
            Err(e) => e.to_string(),
        },
    });
}
