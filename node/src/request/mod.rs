//! The one request path shared by the ext_proc server and the standalone proxy, in two
//! phases with the only IO (the prefix owner lookup) between them:
//!
//! ```text
//!  edge (proxy handler | ext_proc driver)
//!    │ body bytes + RequestMeta
//!    ▼
//!  Dispatcher::prepare ── parse once, rewrite → target model, objective → priority,
//!    │                    candidates, admission, hash the prefix chain once
//!    │ Prepared
//!    ▼
//!  Dispatcher::lookup ─── PrefixOwners::lookup(anchor, chain)   (IO: the anchor's owner,
//!    │                    within the mesh's budget; absent when prefix state is local)
//!    │ PrefixAnswer
//!    ▼
//!  Dispatcher::decide ─── schedule (PrefixSource Local | Remote | Unavailable),
//!    │                    pre_request, record the pick at the owners
//!    ▼
//!  Ticket ── forward / reply … finish (one counted outcome, in-flight released)
//! ```
//!
//! With shared prefix state the scheduler's own prefix index stays empty: each node
//! holds only the chains whose anchors it owns (plus a small cache of its own recent
//! picks, see `crate::mesh::prefix`).

mod decide;
mod meta;
mod owners;
mod prepare;
mod rejection;

pub use decide::Ticket;
pub use meta::{
    DESTINATION_HEADER, FAIRNESS_HEADER, OBJECTIVE_HEADER, REQUEST_ID_HEADER, RequestMeta,
};
pub use owners::{PrefixAnswer, PrefixLookup, PrefixOwners};
pub use prepare::{DispatchConfig, Dispatcher, Prepared};
pub use rejection::{NoEndpoint, Rejection};

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use arc_swap::ArcSwap;
    use infermesh_scheduler::{
        ApiKind, Metrics, PrefixMatches, ResolvedConfig, body_parses_on_this_thread,
    };
    use parking_lot::Mutex;

    use super::*;
    use crate::discovery::EndpointSpec;
    use crate::metrics::{NodeMetrics, Outcome, RewriteLabels};
    use crate::policy::Policy;
    use crate::pool::{EndpointSlot, PoolView};
    use crate::scrape::engine::Engine;

    fn addr(i: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, i], 8000))
    }

    fn dispatcher(waiting: u32, kv: f64) -> Dispatcher {
        let now = Instant::now();
        let slots = (0..4u8)
            .map(|i| {
                let s = Arc::new(EndpointSlot::new(EndpointSpec {
                    address: addr(i),
                    pod: format!("p{i}"),
                    labels: Default::default(),
                    engine: Engine::Vllm,
                }));
                s.record_scrape(Metrics {
                    waiting_queue: waiting,
                    kv_cache_usage: kv,
                    ..Metrics::idle(now)
                });
                s
            })
            .collect();
        let view = PoolView::new(
            "t".into(),
            slots,
            HashSet::from(["m".to_owned()]),
            HashMap::from([("batch".to_owned(), -1), ("chat".to_owned(), 5)]),
        );
        Dispatcher::new(
            Arc::new(ArcSwap::from_pointee(view)),
            Arc::new(ArcSwap::from_pointee(
                Policy::new(&ResolvedConfig::builtin_default()).unwrap(),
            )),
            Arc::new(NodeMetrics::new()),
            DispatchConfig {
                max_body_bytes: 1 << 20,
                staleness: Duration::from_secs(60),
            },
        )
    }

    fn meta(objective: &str) -> RequestMeta {
        RequestMeta::from_headers([(OBJECTIVE_HEADER, objective), ("X-Request-Id", "id-1")])
    }

    const BODY: &[u8] = br#"{"model":"m","prompt":"hello there"}"#;

    #[test]
    fn sheddable_requests_get_429_only_when_saturated() {
        let saturated = dispatcher(50, 0.95);
        let err = saturated
            .dispatch(ApiKind::Completions, BODY, meta("batch"), &[])
            .unwrap_err();
        assert_eq!((err.status(), err.outcome()), (429, Outcome::Shed));
        // Non-sheddable requests are never shed.
        for objective in ["chat", ""] {
            assert!(
                saturated
                    .dispatch(ApiKind::Completions, BODY, meta(objective), &[])
                    .is_ok()
            );
        }
        // Sheddable but the pool is idle.
        let idle = dispatcher(0, 0.1);
        assert!(
            idle.dispatch(ApiKind::Completions, BODY, meta("batch"), &[])
                .is_ok()
        );
    }

    fn with_rewrites(d: Dispatcher, yaml: &str) -> Dispatcher {
        use infermesh_raft_store::policy::{PolicyObject, accept_any_epp_config, parse_documents};
        let docs: Vec<_> = parse_documents(yaml, &accept_any_epp_config())
            .unwrap()
            .into_iter()
            .map(|o| match o {
                PolicyObject::InferenceModelRewrite(d) => d,
                other => panic!("{other:?}"),
            })
            .collect();
        let rewrites =
            crate::policy_store::rewrite::ModelRewrites::from_policy(docs.iter().map(|d| (1, d)));
        let p = d.policy.load().with_rewrites(Arc::new(rewrites));
        d.policy.store(Arc::new(p));
        d
    }

    const REWRITE: &str = "apiVersion: inference.networking.x-k8s.io/v1alpha2\n\
        kind: InferenceModelRewrite\nmetadata: {name: r}\nspec:\n  poolRef: {name: p}\n  \
        rules:\n  - matches: [{model: {value: alias}}]\n    targets: [{modelRewrite: m}]\n  \
        - matches: [{model: {value: gone}}]\n    targets: [{modelRewrite: not-served}]\n";

    #[test]
    fn a_rewritten_model_is_scheduled_and_forwarded_as_its_target() {
        let d = with_rewrites(dispatcher(0, 0.1), REWRITE);
        let body = br#"{"model":"alias","prompt":"hello there","max_tokens":3}"#;
        let t = d
            .dispatch(ApiKind::Completions, body, meta(""), &[])
            .expect("alias is rewritten to the served model m");
        assert_eq!(t.request().model, "alias");
        assert_eq!(t.request().target_model, "m");
        assert_eq!(t.model_restore(), Some(("m", "alias")));
        let fwd: serde_json::Value =
            serde_json::from_slice(&t.rewrite_body(body).expect("body rewritten")).unwrap();
        assert_eq!(
            fwd,
            serde_json::json!({"model": "m", "prompt": "hello there", "max_tokens": 3})
        );
        let decisions = d
            .metrics()
            .model_rewrite_decisions
            .get_or_create(&RewriteLabels {
                model: "alias".into(),
                target: "m".into(),
            })
            .get();
        assert_eq!(decisions, 1);
        // A model without a rule goes through unchanged.
        let t = d
            .dispatch(ApiKind::Completions, BODY, meta(""), &[])
            .unwrap();
        assert_eq!(t.request().target_model, "m");
        assert!(t.rewrite_body(BODY).is_none() && t.model_restore().is_none());
        // A rule whose target the pool does not serve is a 404 naming both models.
        let err = d
            .dispatch(
                ApiKind::Completions,
                br#"{"model":"gone","prompt":"x"}"#,
                meta(""),
                &[],
            )
            .unwrap_err();
        assert_eq!((err.status(), err.outcome()), (404, Outcome::UnknownModel));
        let msg = err.to_string();
        assert!(
            msg.contains("\"gone\"") && msg.contains("\"not-served\""),
            "{msg}"
        );
        let err = d
            .dispatch(
                ApiKind::Completions,
                br#"{"model":"alias2","prompt":"x"}"#,
                meta(""),
                &[],
            )
            .unwrap_err();
        assert_eq!(err.status(), 404);
    }

    #[test]
    fn a_request_body_is_parsed_once_from_prepare_to_the_forwarded_rewrite() {
        let d = with_rewrites(dispatcher(0, 0.1), REWRITE);
        let owners = Arc::new(FakeOwners::default());
        let d = d.with_prefix_owners(owners.clone());
        let body = br#"{"model":"alias","messages":[{"role":"user","content":"hello"}]}"#;
        let before = body_parses_on_this_thread();
        let p = d
            .prepare(ApiKind::ChatCompletions, body, meta(""), &[])
            .unwrap();
        let answer = PrefixAnswer::Matched(PrefixMatches::default());
        let mut t = d.decide(p, answer).unwrap();
        let fwd = t.rewrite_body(body).unwrap();
        t.reschedule(&[t.destinations()[0]]).unwrap();
        assert_eq!(body_parses_on_this_thread() - before, 1);
        assert!(fwd.starts_with(br#"{"model":"m","#));
    }

    #[test]
    fn excluded_endpoints_are_never_picked_and_in_flight_follows_the_ticket() {
        let d = dispatcher(0, 0.1);
        let exclude: Vec<SocketAddr> = (0..3u8).map(addr).collect();
        let t = d
            .dispatch(ApiKind::Completions, BODY, meta(""), &exclude)
            .unwrap();
        let only = addr(3);
        assert_eq!(t.destinations(), [only]);
        let pool = d.pool().load();
        assert_eq!(pool.slot(only).unwrap().in_flight().requests, 1);
        t.finish(None, Outcome::Success, None);
        assert_eq!(pool.slot(only).unwrap().in_flight().requests, 0);
        let all: Vec<SocketAddr> = (0..4u8).map(addr).collect();
        let err = d
            .dispatch(ApiKind::Completions, BODY, meta(""), &all)
            .unwrap_err();
        assert_eq!(err.status(), 503);
    }

    /// One recorded pick: anchor, chain, endpoints.
    type Record = (u64, Vec<u64>, Vec<SocketAddr>);

    /// Owners that answer from a table and remember what was recorded.
    #[derive(Debug, Default)]
    struct FakeOwners {
        answer: Mutex<Vec<(SocketAddr, u32)>>,
        lookups: Mutex<Vec<u64>>,
        records: Mutex<Vec<Record>>,
    }

    impl PrefixOwners for FakeOwners {
        fn lookup(&self, anchor: u64, _hashes: &[u64]) -> PrefixLookup {
            self.lookups.lock().push(anchor);
            let entries = self.answer.lock().clone();
            Box::pin(async move { PrefixAnswer::Matched(PrefixMatches { entries }) })
        }

        fn record(&self, anchor: u64, hashes: &[u64], endpoints: &[SocketAddr]) {
            self.records
                .lock()
                .push((anchor, hashes.to_vec(), endpoints.to_vec()));
        }
    }

    fn long_prompt(model: &str) -> Vec<u8> {
        let prompt = "shared system prompt ".repeat(200);
        serde_json::to_vec(&serde_json::json!({"model": model, "prompt": prompt})).unwrap()
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn shared_prefix_state_follows_the_owner_and_leaves_the_local_index_empty() {
        let owners = Arc::new(FakeOwners::default());
        let d = dispatcher(0, 0.1).with_prefix_owners(owners.clone());
        *owners.answer.lock() = vec![(addr(2), 1000)];
        let t = block_on(d.route(ApiKind::Completions, &long_prompt("m"), meta(""), &[])).unwrap();
        assert_eq!(t.destinations()[0], addr(2), "the owner's match wins");
        let records = owners.records.lock().clone();
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].2, vec![addr(2)]);
        assert_eq!(
            owners.lookups.lock()[0],
            records[0].0,
            "same chain looked up"
        );
        let policy = d.policy().load();
        let index = policy
            .scheduler
            .prefix_index()
            .expect("default config has one");
        assert_eq!(
            index.entries(),
            0,
            "nothing recorded in the node's own index"
        );
    }

    #[test]
    fn a_rewritten_model_is_looked_up_and_recorded_under_its_target() {
        // Bug: the mesh hashed the client's model while scheduling hashed the target.
        let owners = Arc::new(FakeOwners::default());
        let d = with_rewrites(dispatcher(0, 0.1), REWRITE).with_prefix_owners(owners.clone());
        block_on(d.route(ApiKind::Completions, &long_prompt("alias"), meta(""), &[])).unwrap();
        block_on(d.route(ApiKind::Completions, &long_prompt("m"), meta(""), &[])).unwrap();
        let lookups = owners.lookups.lock().clone();
        let records = owners.records.lock().clone();
        assert_eq!(lookups.len(), 2);
        assert_eq!(lookups[0], lookups[1], "alias and m share one chain");
        assert_eq!(records[0].1, records[1].1);
    }

    #[test]
    fn passthrough_paths_route_by_load_without_reading_the_body() {
        let d = dispatcher(0, 0.1);
        let t = d
            .dispatch(ApiKind::Passthrough, b"\x00not json", meta(""), &[])
            .unwrap();
        assert_eq!(t.request().model, "");
        assert!(t.rewrite_body(b"x").is_none());
    }
}
