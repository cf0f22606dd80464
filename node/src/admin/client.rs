//! A small client of the admin API (used by the CLI, tests and the policy benchmark).

use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::Value;

use crate::upstream::{HttpClient, http_client};

/// An admin API call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// `--server` is not a usable URL.
    #[error("--server {server:?}: {reason}")]
    BadServer {
        /// What was given.
        server: String,
        /// Why it is unusable.
        reason: String,
    },
    /// The node could not be reached or the exchange broke off.
    #[error("cannot reach the admin API at {server}: {reason}")]
    Unreachable {
        /// The server.
        server: String,
        /// Why.
        reason: String,
    },
    /// The node answered with an error.
    #[error("{status}: {message}")]
    Api {
        /// HTTP status.
        status: StatusCode,
        /// The error message.
        message: String,
        /// The whole error body.
        body: Value,
    },
}

impl ClientError {
    /// The HTTP status when the node answered with an error.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Calls one node's admin API.
#[derive(Debug, Clone)]
pub struct AdminClient {
    base: String,
    token: Option<String>,
    client: HttpClient,
    timeout: Duration,
}

impl AdminClient {
    /// A client of the admin API at `server` (`http://host:port` or `host:port`), sending
    /// `token` as a bearer token when given.
    pub fn new(server: &str, token: Option<String>) -> Result<AdminClient, ClientError> {
        let base = if server.contains("://") {
            server.trim_end_matches('/').to_owned()
        } else {
            format!("http://{}", server.trim_end_matches('/'))
        };
        let uri: http::Uri =
            base.parse()
                .map_err(|e: http::uri::InvalidUri| ClientError::BadServer {
                    server: server.to_owned(),
                    reason: e.to_string(),
                })?;
        if uri.scheme_str() != Some("http") || uri.authority().is_none() {
            return Err(ClientError::BadServer {
                server: server.to_owned(),
                reason: "expected http://HOST:PORT".into(),
            });
        }
        Ok(AdminClient {
            base,
            token,
            client: http_client(Duration::from_secs(2)),
            timeout: Duration::from_secs(60),
        })
    }

    /// The server's base URL.
    pub fn server(&self) -> &str {
        &self.base
    }

    /// Sends one request; a 2xx answer's JSON body is returned, anything else is an error.
    pub async fn call(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Value, ClientError> {
        let unreachable = |reason: String| ClientError::Unreachable {
            server: self.base.clone(),
            reason,
        };
        let mut req = http::Request::builder()
            .method(method)
            .uri(format!("{}{}", self.base, path_and_query));
        if let Some(t) = &self.token {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        if body.is_some() {
            req = req.header(http::header::CONTENT_TYPE, "application/yaml");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| unreachable(e.to_string()))?;
        let resp = tokio::time::timeout(self.timeout, self.client.request(req))
            .await
            .map_err(|_| unreachable(format!("no answer within {:?}", self.timeout)))?
            .map_err(|e| unreachable(format!("{e}")))?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| unreachable(e.to_string()))?
            .to_bytes();
        let value: Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        if status.is_success() {
            return Ok(value);
        }
        let message = value
            .pointer("/error/message")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_else(|| value.to_string());
        Err(ClientError::Api {
            status,
            message,
            body: value,
        })
    }
}
