//! Admin API errors: one JSON shape, `{"error": {"code", "reason", "message", ...}}`, and
//! the mapping of store errors to HTTP statuses.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use infermesh_raft_store::policy::Rejection;
use infermesh_raft_store::{Applied, ClusterError, ReadError, WriteError};
use serde_json::{Value, json};

/// An error answer of the admin API.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    reason: &'static str,
    message: String,
    details: Value,
}

impl ApiError {
    fn new(status: StatusCode, reason: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            reason,
            message: message.into(),
            details: Value::Null,
        }
    }

    /// 400: the request is malformed.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "BadRequest", message)
    }

    /// 401: a request without a valid token where one is needed.
    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "Unauthorized", message)
    }

    /// 403: a valid token whose role does not allow the request.
    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "Forbidden", message)
    }

    /// 404: no such object or member.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "NotFound", message)
    }

    /// 503: no leader, no quorum, or the leader could not be reached.
    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "Unavailable", message)
    }

    /// 500: a bug on this side.
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "Internal", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut error = json!({
            "code": self.status.as_u16(),
            "reason": self.reason,
            "message": self.message,
        });
        if let (Value::Object(e), Value::Object(d)) = (&mut error, self.details) {
            e.extend(d);
        }
        let mut resp = (self.status, axum::Json(json!({ "error": error }))).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}

impl From<WriteError> for ApiError {
    fn from(e: WriteError) -> ApiError {
        let message = e.to_string();
        match e {
            WriteError::Invalid(d) => ApiError {
                details: json!({
                    "document": d.document,
                    "kind": d.kind,
                    "name": d.name,
                    "field": d.field,
                }),
                ..ApiError::new(StatusCode::BAD_REQUEST, "Invalid", message)
            },
            WriteError::Rejected(Rejection::Conflict { .. }) => {
                ApiError::new(StatusCode::CONFLICT, "Conflict", message)
            }
            WriteError::Rejected(Rejection::NotFound { .. } | Rejection::UnknownToken { .. }) => {
                ApiError::not_found(message)
            }
            WriteError::Rejected(
                Rejection::LastWriteToken | Rejection::TokenInOtherRole { .. },
            ) => ApiError::new(StatusCode::CONFLICT, "Conflict", message),
            // Only a hand-built request can carry a batch op; the admin API never builds one.
            WriteError::Rejected(Rejection::MisplacedBatch) => {
                ApiError::new(StatusCode::BAD_REQUEST, "Invalid", message)
            }
            WriteError::NotLeader { leader, .. } => ApiError {
                details: json!({ "leader": leader }),
                ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "NotLeader", message)
            },
            WriteError::Unavailable(_) => ApiError::unavailable(message),
        }
    }
}

impl From<ReadError> for ApiError {
    fn from(e: ReadError) -> ApiError {
        let message = e.to_string();
        match e {
            ReadError::NotLeader { leader, .. } => ApiError {
                details: json!({ "leader": leader }),
                ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "NotLeader", message)
            },
            ReadError::Unavailable(_) => ApiError::unavailable(message),
        }
    }
}

impl From<ClusterError> for ApiError {
    fn from(e: ClusterError) -> ApiError {
        let message = e.to_string();
        match e {
            ClusterError::UnknownNode(_) => ApiError::not_found(message),
            ClusterError::VoterCount { .. }
            | ClusterError::Refused(_)
            | ClusterError::AlreadyInitialized => {
                ApiError::new(StatusCode::CONFLICT, "Conflict", message)
            }
            ClusterError::NotLeader { .. }
            | ClusterError::Timeout { .. }
            | ClusterError::Unavailable(_)
            | ClusterError::Tokens(_) => ApiError::unavailable(message),
        }
    }
}

/// The JSON answer to a committed write: its index and one line per object.
pub(super) fn applied_json(a: &Applied) -> Value {
    let changes: Vec<Value> = a
        .changes
        .iter()
        .map(|c| {
            json!({
                "kind": c.key.kind.as_str(),
                "namespace": c.key.namespace,
                "name": c.key.name,
                "action": format!("{:?}", c.action).to_lowercase(),
                "resourceVersion": c.resource_version.map(|v| v.to_string()),
            })
        })
        .collect();
    json!({ "index": a.index, "changes": changes })
}
