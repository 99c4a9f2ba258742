//! A small blocking HTTP client of the node's API, for the command line, the
//! demo, the tests and the admin fan-out (ureq: blocking, no TLS stack of its
//! own, bounded in time and size).

use std::time::Duration;

use crate::json::StatusJson;

/// The largest answer read.
const MAX_REPLY_BYTES: u64 = 64 * 1024 * 1024;

/// An API client.
#[derive(Clone)]
pub struct Client {
    agent: ureq::Agent,
    token: Option<String>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .finish_non_exhaustive()
    }
}

/// An answer: status, headers, body.
#[derive(Clone, Debug)]
pub struct Reply {
    /// The HTTP status.
    pub status: u16,
    /// The headers (lower-case names).
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Reply {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON.
    pub fn json(&self) -> Result<serde_json::Value, String> {
        serde_json::from_slice(&self.body).map_err(|e| format!("not JSON ({e}): {}", self.text()))
    }

    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl Client {
    /// A client whose every call ends within `timeout`; `token` is sent as the
    /// bearer token of admin calls.
    pub fn new(timeout: Duration, token: Option<String>) -> Client {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(timeout))
            .build();
        Client {
            agent: ureq::Agent::new_with_config(config),
            token,
        }
    }

    /// One call. `body` is sent for PUT and POST.
    pub fn request(&self, method: &str, url: &str, body: Option<&[u8]>) -> Result<Reply, String> {
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let result = match method {
            "GET" | "DELETE" => {
                let mut r = if method == "GET" {
                    self.agent.get(url)
                } else {
                    self.agent.delete(url)
                };
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.call()
            }
            "PUT" | "POST" => {
                let mut r = if method == "PUT" {
                    self.agent.put(url)
                } else {
                    self.agent.post(url)
                };
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.send(body.unwrap_or_default())
            }
            other => return Err(format!("unsupported method {other}")),
        };
        let mut resp = result.map_err(|e| format!("{method} {url}: {e}"))?;
        let status = resp.status().as_u16();
        let headers = resp
            .headers()
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let body = resp
            .body_mut()
            .with_config()
            .limit(MAX_REPLY_BYTES)
            .read_to_vec()
            .map_err(|e| format!("{method} {url}: reading the answer: {e}"))?;
        Ok(Reply {
            status,
            headers,
            body,
        })
    }

    /// Forwards an admin POST to another member (marked forwarded, so it is not
    /// fanned out again); its status.
    pub fn forward_admin(&self, url: &str) -> Result<u16, String> {
        let mut r = self.agent.post(url).header("x-ha-forwarded", "1");
        if let Some(t) = &self.token {
            r = r.header("Authorization", &format!("Bearer {t}"));
        }
        r.send_empty()
            .map(|resp| resp.status().as_u16())
            .map_err(|e| format!("POST {url}: {e}"))
    }

    /// `GET /v1/status` of the node at `api`.
    pub fn status(&self, api: &str) -> Result<StatusJson, String> {
        let r = self.request(
            "GET",
            &format!("{}/v1/status", api.trim_end_matches('/')),
            None,
        )?;
        if r.status != 200 {
            return Err(format!("{api}: status {}: {}", r.status, r.text()));
        }
        serde_json::from_slice(&r.body).map_err(|e| format!("{api}: bad status JSON: {e}"))
    }
}
