//! `/v1/tokens`: the accepted admin tokens, listed and changed through policy.
//!
//! Only hashes travel: clients hash their tokens (`infermesh tokens add` does) and send
//! `sha256:<hex>`, so a token never crosses the wire in a token change and never reaches
//! the Raft log.

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use infermesh_raft_store::Route;
use infermesh_raft_store::policy::{TokenChange, TokenHash, TokenRole};
use serde::Deserialize;
use serde_json::json;

use super::{AdminState, ApiError, Json, bounded};

/// Where the token routes live.
pub(super) const PATH: &str = "/v1/tokens";

/// Query of the listing.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListQuery {
    #[serde(default)]
    consistent: bool,
}

/// `GET /v1/tokens`: the hashes accepted per role (write tokens only).
pub(super) async fn list(
    State(state): State<AdminState>,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    let policy = if q.consistent {
        state.store.read_linearizable().await?
    } else {
        state.store.policy()
    };
    let texts = |it: &mut dyn Iterator<Item = &TokenHash>| -> Vec<String> {
        it.map(TokenHash::to_text).collect()
    };
    Ok(Json(json!({
        "appliedIndex": policy.applied_index(),
        "write": texts(&mut policy.token_hashes()),
        "read": texts(&mut policy.read_token_hashes()),
    }))
    .into_response())
}

/// One change as the API takes it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChangeBody {
    role: String,
    #[serde(default)]
    add: Vec<String>,
    #[serde(default)]
    remove: Vec<String>,
}

/// The body of `POST /v1/tokens`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChangesBody {
    changes: Vec<ChangeBody>,
}

/// Reads the body into token changes, naming the first bad field.
fn parse(body: &[u8]) -> Result<Vec<TokenChange>, ApiError> {
    let parsed: ChangesBody = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "expected {{\"changes\": [{{\"role\": \"write\"|\"read\", \"add\": [\"sha256:…\"], \"remove\": [\"sha256:…\"]}}]}}: {e}"
        ))
    })?;
    if parsed.changes.is_empty() {
        return Err(ApiError::bad_request("changes: empty; nothing to do"));
    }
    let mut out = Vec::with_capacity(parsed.changes.len());
    for (i, c) in parsed.changes.into_iter().enumerate() {
        let role = match c.role.as_str() {
            "write" => TokenRole::Write,
            "read" => TokenRole::Read,
            other => {
                return Err(ApiError::bad_request(format!(
                    "changes[{i}].role: {other:?}: expected \"write\" or \"read\""
                )));
            }
        };
        if c.add.is_empty() && c.remove.is_empty() {
            return Err(ApiError::bad_request(format!(
                "changes[{i}]: neither add nor remove names a token"
            )));
        }
        let hashes = |field: &str, texts: Vec<String>| -> Result<Vec<TokenHash>, ApiError> {
            texts
                .iter()
                .enumerate()
                .map(|(j, t)| {
                    TokenHash::parse(t).map_err(|e| {
                        ApiError::bad_request(format!("changes[{i}].{field}[{j}]: {e}"))
                    })
                })
                .collect()
        };
        out.push(TokenChange {
            role,
            add: hashes("add", c.add)?,
            remove: hashes("remove", c.remove)?,
        });
    }
    Ok(out)
}

/// `POST /v1/tokens`: adds and removes hashes, all changes or none (write tokens only).
pub(super) async fn change(
    State(state): State<AdminState>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let changes = parse(&body)?;
    let applied = bounded(state.store.change_tokens(changes, Route::ViaLeader)).await?;
    Ok(Json(json!({ "index": applied.index })).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_bodies_name_the_field() {
        let h = TokenHash::of("t").to_text();
        let ok = parse(
            format!(r#"{{"changes":[{{"role":"read","add":["{h}"]}},{{"role":"write","remove":["{h}"]}}]}}"#)
                .as_bytes(),
        )
        .unwrap();
        assert_eq!(ok.len(), 2);
        assert_eq!(ok[0].role, TokenRole::Read);
        assert_eq!(ok[1].remove, vec![TokenHash::of("t")]);
        for (body, names) in [
            (r#"{"changes":[]}"#.to_owned(), "changes: empty"),
            (
                r#"{"changes":[{"role":"admin","add":["x"]}]}"#.to_owned(),
                "changes[0].role",
            ),
            (
                r#"{"changes":[{"role":"read"}]}"#.to_owned(),
                "changes[0]: neither",
            ),
            (
                format!(r#"{{"changes":[{{"role":"read","add":["{h}","plain-token"]}}]}}"#),
                "changes[0].add[1]",
            ),
            (
                r#"{"changes":[{"role":"read","add":[],"extra":1}]}"#.to_owned(),
                "extra",
            ),
            ("not json".to_owned(), "expected"),
        ] {
            let err = parse(body.as_bytes()).unwrap_err();
            assert!(format!("{err:?}").contains(names), "{body}: {err:?}");
        }
    }
}
