//! The live status page every node serves on its metrics port: `/status` (one HTML file,
//! no build step, no external assets), `/status/snapshot` (the JSON it renders) and
//! `/status/events` (the same JSON once a second as server-sent events).

pub mod snapshot;

use std::convert::Infallible;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use axum::Router;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use futures::Stream;

use crate::metrics::NodeMetrics;
use crate::pool::SharedPool;

/// How often the events stream sends a snapshot.
const EVERY: Duration = Duration::from_secs(1);

/// Where a snapshot's parts come from.
#[derive(Clone)]
pub struct Sources {
    /// This node's name.
    pub node: String,
    /// The node's metrics.
    pub metrics: Arc<NodeMetrics>,
    /// The pool view.
    pub pool: SharedPool,
    /// The mesh (weak: the page must not keep a stopped node's mesh alive).
    pub mesh: Option<Weak<infermesh_gossip::Mesh>>,
    /// The policy store, once it is open.
    pub raft: Arc<ArcSwapOption<infermesh_raft_store::PolicyStore>>,
    /// The xDS feed.
    pub xds: crate::xds::XdsFeed,
}

impl Sources {
    /// The snapshot now.
    pub fn snapshot(&self) -> snapshot::Snapshot {
        let mesh = self.mesh.as_ref().and_then(Weak::upgrade);
        let members = mesh.as_ref().map(|m| m.members().borrow().clone());
        let load = mesh.as_ref().map(|m| m.load_view());
        let raft = self.raft.load().as_deref().map(|s| s.status());
        let pool = self.pool.load();
        let xds = self.xds.server().sync_status();
        let prefix = mesh.as_ref().map_or((0, 0), |m| {
            (m.prefix_index_blocks(), m.prefix_index_bytes())
        });
        snapshot::build(&snapshot::Inputs {
            node: &self.node,
            unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            members: members.as_deref(),
            load: load.as_deref(),
            raft: raft.as_ref(),
            pool: &pool,
            now: Instant::now(),
            prefix,
            totals: self.metrics.epp.totals(),
            xds: &xds,
            // Follows the policy: the gate can be turned on or off at runtime.
            queued: self
                .metrics
                .flow_enabled()
                .then(|| self.metrics.flow.queue_size.get()),
        })
    }
}

/// The page's routes.
pub fn router(sources: Sources) -> Router {
    let snap = sources.clone();
    let events = sources;
    Router::new()
        .route("/status", get(|| async { Html(PAGE) }))
        .route(
            "/status/snapshot",
            get(move || {
                let s = snap.snapshot();
                async move { axum::Json(s).into_response() }
            }),
        )
        .route(
            "/status/events",
            get(move || {
                let s = events.clone();
                async move { Sse::new(stream(s)).keep_alive(KeepAlive::default()) }
            }),
        )
}

fn stream(s: Sources) -> impl Stream<Item = Result<Event, Infallible>> {
    futures::stream::unfold((s, true), |(s, first)| async move {
        if !first {
            tokio::time::sleep(EVERY).await;
        }
        let event = Event::default()
            .event("snapshot")
            .json_data(s.snapshot())
            .unwrap_or_else(|e| Event::default().event("error").data(e.to_string()));
        Some((Ok(event), (s, false)))
    })
}

/// The page: plain HTML, CSS and JS, rendering each snapshot as it arrives.
const PAGE: &str = include_str!("page.html");
