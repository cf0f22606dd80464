//! Per-Envoy xDS sync status over HTTP (JSON, [`router`]) and its rendering as a table for
//! `infermesh xds status`.

use std::fmt::Write as _;
use std::net::SocketAddr;

use axum::Router;
use axum::routing::get;
use serde::Serialize;
use serde_json::Value;

use super::XdsFeed;

/// Path of the status route (served on the admin API; on `/metrics`'s server until the
/// admin API carries it).
pub const STATUS_PATH: &str = "/debug/xds";

/// What the status route returns.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct XdsStatusReport {
    /// This node's advertised ext_proc/ADS address.
    pub node: SocketAddr,
    /// Pools served: name, listener, failure mode.
    pub pools: Vec<PoolLine>,
    /// ext_proc endpoints handed to Envoys (every live node).
    pub ext_proc_endpoints: Vec<SocketAddr>,
    /// Versions served and every client's sync status.
    #[serde(flatten)]
    pub sync: infermesh_xds::SyncStatus,
}

/// One served pool, as the status shows it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolLine {
    /// Pool name.
    pub name: String,
    /// Envoy listener address.
    pub listener: SocketAddr,
    /// `FailClose` or `FailOpen`.
    pub failure_mode: infermesh_xds::FailureMode,
}

/// The report of `feed` now.
pub fn report(feed: &XdsFeed) -> XdsStatusReport {
    let input = feed.last_input().unwrap_or_default();
    XdsStatusReport {
        node: feed.advertised(),
        pools: input
            .pools
            .iter()
            .map(|p| PoolLine {
                name: p.name.clone(),
                listener: p.listener,
                failure_mode: p.failure_mode,
            })
            .collect(),
        ext_proc_endpoints: input.ext_proc_endpoints,
        sync: feed.server().sync_status(),
    }
}

/// `GET /debug/xds`: the report as JSON.
pub fn router(feed: XdsFeed) -> Router {
    Router::new().route(
        STATUS_PATH,
        get(move || {
            let r = report(&feed);
            async move { axum::Json(r) }
        }),
    )
}

/// Fetches the report from a node's admin API (or metrics server) at `server`.
pub async fn fetch(
    server: &str,
    token: Option<String>,
    tls: &crate::admin::client::AdminTls,
) -> anyhow::Result<Value> {
    let client = crate::admin::client::AdminClient::with_tls(server, token, tls)?;
    Ok(client.call(http::Method::GET, STATUS_PATH, None).await?)
}

fn short_type(t: &str) -> &str {
    match t {
        "cluster" => "CDS",
        "endpoint" => "EDS",
        "listener" => "LDS",
        "route" => "RDS",
        other => other,
    }
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("-")
}

fn stamp(v: &Value) -> String {
    if v.is_null() {
        return "-".into();
    }
    s(v, "version").to_owned()
}

/// Renders the report as text: the node, what it serves, then one row per client and type.
pub fn render_table(r: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "node {}", s(r, "node"));
    let pools: Vec<String> = r["pools"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            format!(
                "{} (listener {}, {})",
                s(p, "name"),
                s(p, "listener"),
                s(p, "failureMode")
            )
        })
        .collect();
    let _ = writeln!(
        out,
        "pools: {}",
        if pools.is_empty() {
            "none".into()
        } else {
            pools.join(", ")
        }
    );
    let eps: Vec<&str> = r["extProcEndpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let _ = writeln!(out, "ext_proc endpoints: {}", eps.join(", "));
    let versions: Vec<String> = r["versions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|pair| {
            Some(format!(
                "{} {}",
                short_type(pair.get(0)?.as_str()?),
                pair.get(1)?.as_str()?
            ))
        })
        .collect();
    let _ = writeln!(
        out,
        "served versions: {}",
        if versions.is_empty() {
            "none yet".into()
        } else {
            versions.join("  ")
        }
    );
    let mut rows = vec![
        [
            "ENVOY",
            "PROTOCOL",
            "STREAMS",
            "TYPE",
            "LAST SENT",
            "LAST ACKED",
            "IN SYNC",
            "NACKS",
            "LAST NACK",
        ]
        .map(String::from),
    ];
    for e in r["envoys"].as_array().into_iter().flatten() {
        for t in e["types"].as_array().into_iter().flatten() {
            if t["subscribed"] != Value::Bool(true) {
                continue;
            }
            let nack = &t["nack"];
            let nack_text = if nack.is_null() {
                "-".to_owned()
            } else {
                let msg: String = s(nack, "message").chars().take(80).collect();
                format!("{}: {msg}", s(nack, "version"))
            };
            rows.push([
                s(e, "node_id").to_owned(),
                s(e, "protocol").to_owned(),
                e["connected_streams"].to_string(),
                short_type(s(t, "type")).to_owned(),
                stamp(&t["last_sent"]),
                stamp(&t["last_acked"]),
                if t["in_sync"] == Value::Bool(true) {
                    "yes"
                } else {
                    "no"
                }
                .to_owned(),
                t["nacks_total"].to_string(),
                nack_text,
            ]);
        }
    }
    if rows.len() == 1 {
        out.push_str("no Envoy or gRPC client has connected to this node\n");
        return out;
    }
    write_aligned(&rows, &mut out);
    out
}

/// Writes `rows` as left-aligned columns two spaces apart (the CLI's status tables).
pub(crate) fn write_aligned<R: AsRef<[String]>>(rows: &[R], out: &mut String) {
    let Some(first) = rows.first() else {
        return;
    };
    let widths: Vec<usize> = (0..first.as_ref().len())
        .map(|c| {
            rows.iter()
                .map(|r| r.as_ref()[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in rows {
        let line: Vec<String> = row
            .as_ref()
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_each_client_type_and_nack() {
        let r = serde_json::json!({
            "node": "127.0.0.1:9002",
            "pools": [{"name": "llama", "listener": "127.0.0.1:10000", "failureMode": "FailClose"}],
            "extProcEndpoints": ["127.0.0.1:9002", "127.0.0.1:9003"],
            "versions": [["cluster", "c1"], ["endpoint", "e1"], ["listener", "l2"], ["route", "r1"]],
            "envoys": [{
                "node_id": "envoy-1", "cluster": "c", "user_agent": "envoy 1.40.0",
                "protocol": "delta", "connected_streams": 1,
                "types": [
                    {"type": "listener", "subscribed": true, "wildcard": true, "names": 0,
                     "last_sent": {"version": "l2", "nonce": "4", "unix_ms": 1},
                     "last_acked": {"version": "l1", "nonce": "3", "unix_ms": 1},
                     "nack": {"version": "l2", "nonce": "4", "code": 13,
                              "message": "cannot bind 127.0.0.1:1", "unix_ms": 2},
                     "in_sync": false, "nacks_total": 1, "stale_nonces_total": 0},
                    {"type": "route", "subscribed": false, "wildcard": false, "names": 0,
                     "last_sent": null, "last_acked": null, "nack": null,
                     "in_sync": true, "nacks_total": 0, "stale_nonces_total": 0}
                ]
            }]
        });
        let t = render_table(&r);
        assert!(
            t.contains("llama (listener 127.0.0.1:10000, FailClose)"),
            "{t}"
        );
        assert!(t.contains("LDS l2"), "{t}");
        let row = t.lines().find(|l| l.starts_with("envoy-1")).unwrap();
        for cell in ["delta", "LDS", "l2", "l1", "no", "cannot bind"] {
            assert!(row.contains(cell), "{cell} missing in {row}");
        }
        assert!(
            !t.contains("RDS  "),
            "unsubscribed types are not listed: {t}"
        );
        let empty = render_table(&serde_json::json!({"node": "n", "envoys": []}));
        assert!(empty.contains("no Envoy"));
    }
}
