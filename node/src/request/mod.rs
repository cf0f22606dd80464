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
//!  Dispatcher::flow_wait ─ (`flowControl` gate only) wait in the node's flow controller
//!    │                    until dispatched, or a 429/503 with the drop reason (`flow.rs`)
//!    ▼
//!  Dispatcher::burst_wait  (`burst-prefix-cache-producer` only) wait for the batch
//!    │                    window to close; the batch is placed jointly (`burst.rs`)
//!    ▼
//!  Dispatcher::lookup ─── PrefixOwners::lookup(anchor, chain)   (IO: the anchor's owner,
//!    │                    within the mesh's budget; absent when prefix state is local)
//!    │ PrefixAnswer
//!    ▼
//!  Dispatcher::decide ─── schedule (PrefixSource Local | Remote | Unavailable),
//!    │                    count the disagg decision, 412 for `Prefer: if-available`
//!    │                    without a cached prefix, else pre_request and record the
//!    │                    pick at the owners
//!    ▼
//!  Ticket ── forward / reply … finish (one counted outcome, in-flight released)
//! ```
//!
//! With shared prefix state the scheduler's own prefix index stays empty: each node
//! holds only the chains whose anchors it owns (plus a small cache of its own recent
//! picks, see `crate::mesh::prefix`).

pub mod burst;
mod decide;
pub mod flow;
pub mod flow_mesh;
mod meta;
mod owners;
pub mod picks;
mod prepare;
mod rejection;

pub use burst::BurstWait;
pub use decide::Ticket;
pub use flow::FlowGate;
pub use meta::{
    DESTINATION_HEADER, FAIRNESS_HEADER, FAIRNESS_HEADER_ALIAS, OBJECTIVE_HEADER,
    OBJECTIVE_HEADER_ALIAS, REQUEST_ID_HEADER, ROUTER_ONLY_HEADERS, RequestMeta, router_only,
};
pub use owners::{PrefixAnswer, PrefixLookup, PrefixOwners};
pub use prepare::{DispatchConfig, Dispatcher, FlowWait, Prepared};
pub use rejection::{NoEndpoint, Rejection};

/// `d` behind a flow gate over its own pool (refreshed every 2 ms, one live node), with
/// `cfg` as the policy's flow control, for the tests of the request path and its edges;
/// the sender shuts the gate down.
#[cfg(test)]
pub(crate) fn gated_for_tests(
    d: Dispatcher,
    cfg: infermesh_scheduler::flow::FlowConfig,
) -> (Dispatcher, tokio::sync::watch::Sender<bool>) {
    gate_for_tests(d, Some(cfg))
}

/// As [`gated_for_tests`], with the policy's flow control `cfg` (`None`: the gate off,
/// though the owner runs and follows later policy swaps).
#[cfg(test)]
pub(crate) fn gate_for_tests(
    d: Dispatcher,
    cfg: Option<infermesh_scheduler::flow::FlowConfig>,
) -> (Dispatcher, tokio::sync::watch::Sender<bool>) {
    fenced_for_tests(d, cfg, picks::PICK_FENCE)
}

/// As [`gate_for_tests`], with a dispatch waiting at most `pick_fence` for the pick of
/// the one before it.
#[cfg(test)]
pub(crate) fn fenced_for_tests(
    d: Dispatcher,
    cfg: Option<infermesh_scheduler::flow::FlowConfig>,
    pick_fence: std::time::Duration,
) -> (Dispatcher, tokio::sync::watch::Sender<bool>) {
    let (sd, sd_rx) = tokio::sync::watch::channel(false);
    let flow = cfg.map(std::sync::Arc::new);
    d.policy()
        .rcu(|p| std::sync::Arc::new(p.with_flow(flow.clone())));
    let (gate, _task) = FlowGate::spawn(
        flow::FlowDriverConfig {
            refresh: std::time::Duration::from_millis(2),
            staleness: std::time::Duration::from_secs(60),
            pick_fence,
            freed_hint: picks::FREED_HINT,
        },
        d.pool().clone(),
        d.policy().clone(),
        d.metrics().clone(),
        std::sync::Arc::new(|| 1),
        sd_rx,
    )
    .expect("valid flow config");
    (d.with_flow(gate), sd)
}

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
        dispatcher_with(&ResolvedConfig::builtin_default(), waiting, kv)
    }

    fn dispatcher_with(cfg: &ResolvedConfig, waiting: u32, kv: f64) -> Dispatcher {
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
            Arc::new(ArcSwap::from_pointee(Policy::new(cfg).unwrap())),
            Arc::new(NodeMetrics::new()),
            DispatchConfig {
                max_body_bytes: 1 << 20,
                staleness: Duration::from_secs(60),
                emit_endpoint_scores: false,
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

    #[tokio::test]
    async fn only_a_policy_with_the_burst_producer_holds_requests() {
        // Without the producer there is no window step at all.
        let d = dispatcher(0, 0.1);
        let p = d
            .prepare(ApiKind::Completions, BODY, meta(""), &[])
            .unwrap();
        assert!(d.burst_wait(&p).is_none());
        // With it, a lone request waits out its window, then goes on unplaced.
        let cfg = infermesh_scheduler::load_config(
            "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n\
             - type: burst-prefix-cache-producer\n  parameters: {windowDurationMs: 40}\n",
        )
        .unwrap();
        let d = dispatcher_with(&cfg, 0, 0.1);
        let started = Instant::now();
        let t = d
            .route(ApiKind::Completions, BODY, meta(""), &[])
            .await
            .unwrap();
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(40), "{waited:?}");
        assert!(
            waited < Duration::from_secs(2),
            "not held past the window: {waited:?}"
        );
        assert_eq!(t.destinations().len(), 1);
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

    #[test]
    fn a_ticket_holds_the_estimated_output_tokens_when_configured() {
        // 400 prompt bytes = 100 tokens; the client allows 120 output tokens.
        let body = format!(
            r#"{{"model":"m","prompt":"{}","max_tokens":120}}"#,
            "a".repeat(400)
        );
        let held = |producer: &str| -> u64 {
            let cfg = infermesh_scheduler::load_config(&format!(
                "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: inflight-load-producer\n  parameters: {producer}\n- type: queue-scorer\n"
            ))
            .unwrap();
            let d = dispatcher_with(&cfg, 0, 0.1);
            let t = d
                .dispatch(ApiKind::Completions, body.as_bytes(), meta(""), &[])
                .unwrap();
            let pool = d.pool().load();
            let slot = pool.slot(t.destinations()[0]).unwrap().clone();
            let tokens = slot.in_flight().tokens;
            t.finish(None, Outcome::Success, None);
            assert_eq!(slot.in_flight().tokens, 0, "released with the ticket");
            tokens
        };
        assert_eq!(held("{}"), 100);
        // round(100 × 1.5) = 150, bounded by max_tokens 120.
        assert_eq!(held("{addEstimatedOutputTokens: true}"), 100 + 120);
        assert_eq!(
            held("{addEstimatedOutputTokens: true, outputRatio: 0.5}"),
            100 + 50
        );
    }

    /// One recorded pick: anchor, chain, endpoints.
    type Record = (u64, Vec<u64>, Vec<SocketAddr>);

    /// Owners that answer from a table and remember what was recorded.
    #[derive(Debug, Default)]
    struct FakeOwners {
        answer: Mutex<Vec<(SocketAddr, u32)>>,
        lookups: Mutex<Vec<u64>>,
        records: Mutex<Vec<Record>>,
        speculated: Mutex<Vec<(Record, Duration)>>,
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

        fn speculate(&self, anchor: u64, hashes: &[u64], endpoints: &[SocketAddr], ttl: Duration) {
            self.speculated
                .lock()
                .push(((anchor, hashes.to_vec(), endpoints.to_vec()), ttl));
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

    fn precise(extra: &str) -> ResolvedConfig {
        infermesh_scheduler::load_config(&format!(
            "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n\
             - type: token-producer\n\
             - type: precise-prefix-cache-producer\n  parameters: {{tokenProcessorConfig: {{blockSize: 16}}{extra}}}\n\
             - type: prefix-cache-scorer\n  parameters: {{prefixMatchInfoProducerName: precise-prefix-cache-producer}}\n\
             - type: max-score-picker\n\
             schedulingProfiles:\n- name: default\n  plugins:\n  - pluginRef: prefix-cache-scorer\n  - pluginRef: max-score-picker\n"
        ))
        .unwrap()
    }

    #[test]
    fn precise_keys_the_tokens_asks_the_owner_and_records_nothing() {
        let owners = Arc::new(FakeOwners::default());
        let tokenizers = Arc::new(crate::tokens::Tokenizers::new(
            crate::upstream::http_client(Duration::from_secs(1)),
        ));
        let d = dispatcher_with(&precise(""), 0, 0.1)
            .with_prefix_owners(owners.clone())
            .with_tokenizers(tokenizers);
        *owners.answer.lock() = vec![(addr(3), 1000)];
        let body = long_prompt("m");
        let t = block_on(d.route(ApiKind::Completions, &body, meta(""), &[])).unwrap();
        assert_eq!(t.destinations()[0], addr(3), "the owner's match wins");
        // The anchor is the first request key of the estimate backend's token ids.
        let prompt = "shared system prompt ".repeat(200);
        let ids = crate::tokens::estimate(prompt.as_bytes());
        let keys = infermesh_scheduler::prefix::request_keys(
            infermesh_scheduler::prefix::request_seed("m", None),
            &ids,
            16,
            usize::MAX,
        );
        assert_eq!(owners.lookups.lock().clone(), vec![keys[0]]);
        assert_eq!(t.request().prompt_tokens.as_deref(), Some(&ids[..]));
        assert!(
            owners.records.lock().is_empty(),
            "events are the only truth"
        );
        assert!(
            owners.speculated.lock().is_empty(),
            "speculation is off by default"
        );
        let m = d.metrics().render(&d.pool().load(), Instant::now());
        assert!(
            m.contains("infermesh_tokenizations_total{backend=\"estimate\",result=\"ok\"} 1"),
            "{m}"
        );
        // The same prompt again is served from the token cache.
        block_on(d.route(ApiKind::Completions, &body, meta(""), &[])).unwrap();
        assert!(
            d.metrics()
                .render(&d.pool().load(), Instant::now())
                .contains(
                    "infermesh_tokenizations_total{backend=\"estimate\",result=\"cached\"} 1"
                )
        );
    }

    #[test]
    fn precise_speculative_indexing_seeds_the_pick_locally() {
        let owners = Arc::new(FakeOwners::default());
        let tokenizers = Arc::new(crate::tokens::Tokenizers::new(
            crate::upstream::http_client(Duration::from_secs(1)),
        ));
        let d = dispatcher_with(
            &precise(", speculativeIndexing: true, speculativeTTL: 750ms"),
            0,
            0.1,
        )
        .with_prefix_owners(owners.clone())
        .with_tokenizers(tokenizers);
        let t = block_on(d.route(ApiKind::Completions, &long_prompt("m"), meta(""), &[])).unwrap();
        let spec = owners.speculated.lock().clone();
        assert_eq!(spec.len(), 1);
        assert_eq!(spec[0].0.2, vec![t.destinations()[0]]);
        assert_eq!(spec[0].1, Duration::from_millis(750));
        assert!(owners.records.lock().is_empty());
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

    mod flow_gate {
        use infermesh_scheduler::flow::{DropReason, FlowConfig, Outcome as FlowOutcome};
        use std::num::NonZeroU64;

        use super::*;
        use crate::metrics::FlowOutcomeLabels;

        /// A saturated pool (queue 50 against a threshold of 5) with flow control on.
        fn gated(cfg: FlowConfig) -> (Dispatcher, tokio::sync::watch::Sender<bool>) {
            super::super::gated_for_tests(dispatcher(50, 0.95), cfg)
        }

        fn set_load(d: &Dispatcher, waiting: u32) {
            for s in &d.pool().load().slots {
                s.record_scrape(Metrics {
                    waiting_queue: waiting,
                    ..Metrics::idle(Instant::now())
                });
            }
        }

        fn outcomes(d: &Dispatcher, outcome: FlowOutcome) -> u64 {
            d.metrics()
                .flow
                .requests
                .get_or_create(&FlowOutcomeLabels {
                    outcome: outcome.as_str(),
                })
                .get()
        }

        async fn until(what: &str, f: impl Fn() -> bool) {
            for _ in 0..2000 {
                if f() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            panic!("timed out waiting for {what}");
        }

        fn spawn_route(
            d: &Dispatcher,
            objective: &str,
        ) -> tokio::task::JoinHandle<Result<Ticket, Rejection>> {
            let d = d.clone();
            let m = meta(objective);
            tokio::spawn(async move { d.route(ApiKind::Completions, BODY, m, &[]).await })
        }

        #[tokio::test]
        async fn a_sheddable_request_waits_while_saturated_and_goes_when_load_drops() {
            let (d, _sd) = gated(FlowConfig::default());
            let task = spawn_route(&d, "batch");
            until("the request to queue", || {
                d.metrics().flow.queue_size.get() == 1
            })
            .await;
            assert!(!task.is_finished(), "no 429 at once with the gate on");
            set_load(&d, 0);
            let ticket = task.await.unwrap().expect("dispatched once load dropped");
            assert_eq!(ticket.request().priority, -1);
            assert_eq!(outcomes(&d, FlowOutcome::Dispatched), 1);
            until("the gauge to drop", || {
                d.metrics().flow.queue_size.get() == 0
            })
            .await;
        }

        #[tokio::test]
        async fn a_request_past_its_ttl_gets_429_ttl_expired() {
            let cfg = FlowConfig {
                default_request_ttl: Some(Duration::from_millis(30)),
                ..FlowConfig::default()
            };
            let (d, _sd) = gated(cfg);
            let err = d
                .route(ApiKind::Completions, BODY, meta("chat"), &[])
                .await
                .unwrap_err();
            assert_eq!(err, Rejection::Flow(DropReason::TtlExpired));
            assert_eq!(err.status(), 429);
            assert_eq!(
                err.to_http("r").headers()["x-llm-d-request-dropped-reason"],
                "rejected-ttl-expired"
            );
            assert_eq!(outcomes(&d, FlowOutcome::EvictedTtl), 1);
            assert_eq!(
                d.metrics()
                    .requests
                    .get_or_create(&crate::metrics::RequestLabels {
                        model: "m".into(),
                        objective: "chat".into(),
                        outcome: Outcome::Shed,
                    })
                    .get(),
                1,
                "counted once in infermesh_requests_total"
            );
        }

        #[tokio::test]
        async fn a_client_that_goes_away_frees_its_place_at_once() {
            let (d, _sd) = gated(FlowConfig::default());
            let task = spawn_route(&d, "");
            until("the request to queue", || {
                d.metrics().flow.queue_size.get() == 1
            })
            .await;
            task.abort();
            until("the place to be freed", || {
                d.metrics().flow.queue_size.get() == 0
            })
            .await;
            assert_eq!(outcomes(&d, FlowOutcome::EvictedContextCancelled), 1);
            assert_eq!(d.metrics().flow.queue_bytes.get(), 0);
        }

        #[tokio::test]
        async fn a_full_queue_refuses_with_429_capacity() {
            let cfg = FlowConfig {
                max_requests: NonZeroU64::new(1),
                ..FlowConfig::default()
            };
            let (d, _sd) = gated(cfg);
            let first = spawn_route(&d, "");
            until("the first to queue", || {
                d.metrics().flow.queue_size.get() == 1
            })
            .await;
            let err = d
                .route(ApiKind::Completions, BODY, meta(""), &[])
                .await
                .unwrap_err();
            assert_eq!(err, Rejection::Flow(DropReason::Saturated));
            assert_eq!(err.status(), 429);
            assert_eq!(outcomes(&d, FlowOutcome::RejectedCapacity), 1);
            set_load(&d, 0);
            assert!(first.await.unwrap().is_ok());
        }

        fn arrival() -> flow::FlowArrival {
            flow::FlowArrival {
                priority: 0,
                fairness_id: "f".into(),
                bytes: 10,
                received: Instant::now(),
                slo_ttft: None,
            }
        }

        #[tokio::test]
        async fn a_dispatch_waits_for_the_pick_before_it_and_carries_it() {
            // A fence no test outlasts: only a pick (or an end) opens it.
            let (d, _sd) = super::super::fenced_for_tests(
                dispatcher(0, 0.0),
                Some(FlowConfig::default()),
                Duration::from_secs(600),
            );
            let gate = d.flow.clone().unwrap();
            let mut first = gate.wait(arrival()).await.expect("an idle pool dispatches");
            assert!(first.claims.is_empty());
            let waiting = |gate: &flow_mesh::TierGate| {
                let gate = gate.clone();
                tokio::spawn(async move { gate.wait(arrival()).await })
            };
            let second = waiting(&gate);
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert!(
                !second.is_finished(),
                "the second waits for the first's pick, though the pool has room"
            );
            first.picked(addr(2));
            let mut second = second.await.unwrap().expect("dispatched at the pick");
            assert_eq!(
                second.claims.prefilling,
                vec![(addr(2), 1)],
                "it sees the first's pod"
            );
            // The first's prefill ends; the second picks: the third sees only the second.
            first.prefilled();
            second.picked(addr(3));
            let third = waiting(&gate).await.unwrap().expect("dispatched");
            assert_eq!(third.claims.prefilling, vec![(addr(3), 1)]);
            // A request that ends before its pick (no endpoint fit, client gone) opens
            // the fence too.
            let fourth = waiting(&gate);
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert!(!fourth.is_finished());
            drop(third);
            let fourth = fourth
                .await
                .unwrap()
                .expect("dispatched once the third ended");
            assert_eq!(fourth.claims.prefilling, vec![(addr(3), 1)]);
            drop(second);
            drop(fourth);
            let fifth = waiting(&gate).await.unwrap().expect("dispatched");
            assert!(
                fifth.claims.prefilling.is_empty(),
                "an ended request's pod is free"
            );
        }

        #[tokio::test]
        async fn a_revocation_reaches_a_dispatch_still_behind_the_fence() {
            let (d, _sd) = super::super::fenced_for_tests(
                dispatcher(0, 0.0),
                Some(FlowConfig {
                    enable_eviction: true,
                    ..FlowConfig::default()
                }),
                Duration::from_secs(600),
            );
            let gate = d.flow.clone().unwrap();
            let waiting = |priority: i32| {
                let gate = gate.clone();
                tokio::spawn(async move {
                    gate.wait(flow::FlowArrival {
                        priority,
                        ..arrival()
                    })
                    .await
                })
            };
            // The first never reports a pick: the fence holds every dispatch after it.
            let _first = gate.wait(arrival()).await.expect("an idle pool dispatches");
            let sheddable = waiting(-1);
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert!(!sheddable.is_finished(), "decided, but behind the fence");
            // The pool saturates and a critical request waits: eviction picks the sheddable
            // one, which must be let out to be revoked.
            set_load(&d, 50);
            let _critical = waiting(10);
            let sheddable = tokio::time::timeout(Duration::from_secs(60), sheddable)
                .await
                .expect("delivered when chosen for revocation, fence or not")
                .unwrap()
                .expect("dispatched");
            let revoked = sheddable.revoked().expect("a sheddable lease is revocable");
            tokio::time::timeout(Duration::from_secs(60), revoked)
                .await
                .expect("and revoked");
        }

        /// Each candidate's (prefilling, requests) after a dispatch that carried `claims`.
        fn counts_after_claims(
            d: &Dispatcher,
            p: &mut Prepared,
            claims: picks::Claims,
        ) -> Vec<(u32, u32)> {
            let dispatched = flow::Dispatched {
                waited: Duration::ZERO,
                lease: None,
                usage: None,
                grant: None,
                claims,
            };
            d.after_flow(p, Ok(dispatched)).unwrap();
            p.candidates
                .iter()
                .map(|e| (e.in_flight.prefilling, e.in_flight.requests))
                .collect()
        }

        #[test]
        fn claims_raise_a_candidates_prefill_count_to_at_least_theirs() {
            let d = dispatcher(0, 0.0);
            let mut p = d
                .prepare(ApiKind::Completions, BODY, meta(""), &[])
                .unwrap();
            p.candidates[1].in_flight.prefilling = 3;
            p.candidates[1].in_flight.requests = 3;
            let claims = picks::Claims {
                prefilling: vec![(addr(0), 2), (addr(1), 1), (addr(9), 4)],
                freed: Vec::new(),
            };
            let counts = counts_after_claims(&d, &mut p, claims);
            assert_eq!(counts, vec![(2, 2), (3, 3), (0, 0), (0, 0)]);
        }

        #[test]
        fn freed_prefills_come_off_a_candidates_count_down_to_the_queues() {
            let d = dispatcher(0, 0.0);
            let mut p = d
                .prepare(ApiKind::Completions, BODY, meta(""), &[])
                .unwrap();
            // The board still counts the prefills that just ended on pods 0 and 1, and on
            // pod 2 one the queue does not know (it did not pass the queue).
            for (i, n) in [(0, 1), (1, 3), (2, 2)] {
                p.candidates[i].in_flight.prefilling = n;
                p.candidates[i].in_flight.requests = n + 1;
            }
            let claims = picks::Claims {
                prefilling: vec![(addr(1), 2)],
                freed: vec![(addr(0), 1), (addr(1), 2), (addr(2), 1)],
            };
            let counts = counts_after_claims(&d, &mut p, claims);
            // Pod 1 keeps the two the queue knows prefill there; pod 2 keeps its other one.
            assert_eq!(counts, vec![(0, 1), (2, 3), (1, 2), (0, 0)]);
        }

        fn swap_flow(d: &Dispatcher, cfg: Option<FlowConfig>) {
            let flow = cfg.map(Arc::new);
            d.policy().rcu(|p| Arc::new(p.with_flow(flow.clone())));
        }

        #[tokio::test]
        async fn a_gate_turned_on_at_runtime_makes_requests_wait() {
            let (d, _sd) = super::super::gate_for_tests(dispatcher(50, 0.95), None);
            assert!(!d.flow_enabled());
            // Off: a sheddable request on a saturated pool is shed at once.
            let err = d
                .route(ApiKind::Completions, BODY, meta("batch"), &[])
                .await
                .unwrap_err();
            assert_eq!(err.outcome(), Outcome::Shed);
            assert!(!d.metrics().flow_enabled());
            swap_flow(&d, Some(FlowConfig::default()));
            assert!(d.flow_enabled());
            let task = spawn_route(&d, "batch");
            until("the request to queue", || {
                d.metrics().flow.queue_size.get() == 1
            })
            .await;
            assert!(d.metrics().flow_enabled(), "the owner follows the policy");
            assert!(!task.is_finished());
            set_load(&d, 0);
            assert!(task.await.unwrap().is_ok());
            assert_eq!(outcomes(&d, FlowOutcome::Dispatched), 1);
        }

        #[tokio::test]
        async fn a_gate_turned_off_at_runtime_releases_the_queue_and_lets_requests_bypass() {
            let (d, _sd) = gated(FlowConfig::default());
            let waiting: Vec<_> = (0..3).map(|_| spawn_route(&d, "")).collect();
            until("the requests to queue", || {
                d.metrics().flow.queue_size.get() == 3
            })
            .await;
            // Still saturated: only turning the gate off lets them go.
            swap_flow(&d, None);
            for t in waiting {
                assert!(t.await.unwrap().is_ok(), "released, not dropped");
            }
            assert_eq!(outcomes(&d, FlowOutcome::Dispatched), 3);
            until("the owner to record the switch", || {
                !d.metrics().flow_enabled()
            })
            .await;
            assert_eq!(d.metrics().flow.queue_size.get(), 0);
            // New requests bypass: a sheddable one is shed by admission, at once.
            let err = d
                .route(ApiKind::Completions, BODY, meta("batch"), &[])
                .await
                .unwrap_err();
            assert_eq!(err.outcome(), Outcome::Shed);
            assert!(
                d.route(ApiKind::Completions, BODY, meta(""), &[])
                    .await
                    .is_ok()
            );
            assert_eq!(
                outcomes(&d, FlowOutcome::Dispatched),
                3,
                "nothing more entered"
            );
        }

        #[tokio::test]
        async fn shutdown_answers_every_waiting_request() {
            let (d, sd) = gated(FlowConfig::default());
            let task = spawn_route(&d, "");
            until("the request to queue", || {
                d.metrics().flow.queue_size.get() == 1
            })
            .await;
            sd.send(true).unwrap();
            let err = task.await.unwrap().unwrap_err();
            assert_eq!(err, Rejection::Flow(DropReason::ShuttingDown));
            assert_eq!(err.status(), 503);
        }
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

    #[test]
    fn vllm_generate_is_routed_with_or_without_a_model() {
        let d = dispatcher(0, 0.1);
        let t = d
            .dispatch(
                ApiKind::VllmGenerate,
                br#"{"token_ids":[1,2,3]}"#,
                meta(""),
                &[],
            )
            .unwrap();
        assert_eq!(t.request().model, "");
        assert_eq!(t.request().prompt_bytes.len(), 12, "token ids are hashed");
        d.dispatch(
            ApiKind::VllmGenerate,
            br#"{"model":"m","token_ids":[1]}"#,
            meta(""),
            &[],
        )
        .unwrap();
        // A model that is named must be served, as on every other path.
        let e = d
            .dispatch(
                ApiKind::VllmGenerate,
                br#"{"model":"x","token_ids":[1]}"#,
                meta(""),
                &[],
            )
            .unwrap_err();
        assert!(matches!(e, Rejection::UnknownModel { .. }), "{e:?}");
        let e = d
            .dispatch(ApiKind::VllmGenerate, br#"{"token_ids":[]}"#, meta(""), &[])
            .unwrap_err();
        assert_eq!(e.status(), 400);
    }

    mod disagg {
        use infermesh_scheduler::plugins::profiles::{ENCODERS_HEADER, PREFILLER_HEADER};

        use super::*;
        use crate::metrics::{DecisionLabels, RequestLabels};

        const HEAD: &str = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n";
        const PD: &str = "plugins:\n- type: decode-filter\n- type: prefill-filter\n- type: prefix-cache-scorer\n- type: prefix-based-pd-decider\n  parameters: {nonCachedTokens: 16}\n- type: disagg-profile-handler\n  parameters: {deciders: {prefill: prefix-based-pd-decider}}\nschedulingProfiles:\n- name: decode\n  plugins: [{pluginRef: decode-filter}, {pluginRef: prefix-cache-scorer}]\n- name: prefill\n  plugins: [{pluginRef: prefill-filter}, {pluginRef: prefix-cache-scorer}]\n";

        /// Pod `i` (address `addr(i)`) has role `roles[i]`; the scheduler runs `yaml` (the
        /// built-in default when empty).
        fn roled(roles: &[&str], yaml: &str) -> Dispatcher {
            let now = Instant::now();
            let slots = roles
                .iter()
                .enumerate()
                .map(|(i, role)| {
                    let s = Arc::new(EndpointSlot::new(EndpointSpec {
                        address: addr(i as u8),
                        pod: format!("p{i}"),
                        labels: [("llm-d.ai/role".to_owned(), (*role).to_owned())].into(),
                        engine: Engine::Vllm,
                    }));
                    s.record_scrape(Metrics::idle(now));
                    s
                })
                .collect();
            let view = PoolView::new(
                "t".into(),
                slots,
                HashSet::from(["m".to_owned()]),
                HashMap::new(),
            );
            let cfg = if yaml.is_empty() {
                ResolvedConfig::builtin_default()
            } else {
                infermesh_scheduler::load_config(&format!("{HEAD}{yaml}")).unwrap()
            };
            Dispatcher::new(
                Arc::new(ArcSwap::from_pointee(view)),
                Arc::new(ArcSwap::from_pointee(Policy::new(&cfg).unwrap())),
                Arc::new(NodeMetrics::new()),
                DispatchConfig {
                    max_body_bytes: 1 << 20,
                    staleness: Duration::from_secs(60),
                    emit_endpoint_scores: false,
                },
            )
        }

        fn pd() -> Dispatcher {
            roled(&["prefill", "prefill", "decode", "decode"], PD)
        }

        fn prefer(value: &str) -> RequestMeta {
            RequestMeta::from_headers([("Prefer", value), ("X-Request-Id", "id-1")])
        }

        fn header<'a>(t: &'a Ticket, name: &str) -> Option<&'a str> {
            t.extra_headers()
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        }

        fn decisions(d: &Dispatcher, pd_family: bool, plugin: &str, decision: &'static str) -> u64 {
            let family = if pd_family {
                &d.metrics().pd_decisions
            } else {
                &d.metrics().disagg_decisions
            };
            family
                .get_or_create(&DecisionLabels {
                    plugin_name: plugin.into(),
                    plugin_type: plugin_type(plugin),
                    model_name: "m".into(),
                    decision_type: decision,
                })
                .get()
        }

        fn plugin_type(plugin: &str) -> &'static str {
            if plugin == "pd-profile-handler" {
                "pd-profile-handler"
            } else {
                "disagg-profile-handler"
            }
        }

        #[test]
        fn prefer_if_available_is_412_until_the_decode_pod_caches_the_prompt() {
            let d = pd();
            let body = long_prompt("m");
            let err = d
                .dispatch(ApiKind::Completions, &body, prefer("if-available"), &[])
                .unwrap_err();
            assert_eq!(err, Rejection::DecodeCacheMiss);
            assert_eq!((err.status(), err.outcome()), (412, Outcome::CacheMiss));
            // The proxy's answer (ext_proc sends the same status and body).
            let resp = err.to_http("id-1");
            assert_eq!(resp.status().as_u16(), 412);
            let json: serde_json::Value = serde_json::from_slice(resp.body()).unwrap();
            assert_eq!(
                json["error"]["message"],
                "no decode worker has the requested KV cache"
            );
            assert_eq!(json["error"]["code"], 412);
            let policy = d.policy().load();
            let index = policy.scheduler.prefix_index().unwrap();
            assert_eq!(index.entries(), 0, "a 412 records nothing");

            // Without the header the request is served, disaggregated.
            let t = d
                .dispatch(ApiKind::Completions, &body, meta(""), &[])
                .unwrap();
            let decode = t.destinations()[0];
            assert!([addr(2), addr(3)].contains(&decode));
            let prefill: SocketAddr = header(&t, PREFILLER_HEADER).unwrap().parse().unwrap();
            assert!([addr(0), addr(1)].contains(&prefill));
            drop(t);

            // Now the decode pod holds the prompt: if-available is served, decode only.
            let t = d
                .dispatch(
                    ApiKind::Completions,
                    &body,
                    prefer("respond-async, if-available"),
                    &[],
                )
                .unwrap();
            assert_eq!(t.destinations()[0], decode);
            assert_eq!(header(&t, PREFILLER_HEADER), None);
            drop(t);

            // Another prompt with the header: the decode pods hold none of it.
            let other =
                serde_json::to_vec(&serde_json::json!({"model": "m", "prompt": "z".repeat(800)}))
                    .unwrap();
            assert_eq!(
                d.dispatch(ApiKind::Completions, &other, prefer("if-available"), &[])
                    .unwrap_err()
                    .status(),
                412
            );
            let cache_misses = d
                .metrics()
                .requests
                .get_or_create(&RequestLabels {
                    model: "m".into(),
                    objective: String::new(),
                    outcome: Outcome::CacheMiss,
                })
                .get();
            assert_eq!(cache_misses, 2);
        }

        #[test]
        fn without_prefer_a_cold_prompt_is_never_412() {
            let d = roled(&["decode", "decode"], "");
            let t = d
                .dispatch(ApiKind::Completions, &long_prompt("m"), meta(""), &[])
                .expect("the builtin default serves cold prompts");
            drop(t);
            // llm-d applies the gate whatever the profile handler: single-profile too.
            let t = d
                .dispatch(
                    ApiKind::Completions,
                    &long_prompt("m"),
                    prefer("if-available"),
                    &[],
                )
                .expect("the picked pod holds the prompt now");
            drop(t);
            let err = d
                .dispatch(ApiKind::Completions, BODY, prefer("if-available"), &[])
                .unwrap_err();
            assert_eq!(err.status(), 412);
        }

        #[test]
        fn each_scheduled_request_counts_one_decision_by_type() {
            let d = pd();
            let body = long_prompt("m");
            // 412 still counts: llm-d's handler counts when its stages finish.
            d.dispatch(ApiKind::Completions, &body, prefer("if-available"), &[])
                .unwrap_err();
            let t = d
                .dispatch(ApiKind::Completions, &body, meta(""), &[])
                .unwrap();
            drop(t);
            for _ in 0..3 {
                d.dispatch(ApiKind::Completions, &body, meta(""), &[])
                    .unwrap();
            }
            let h = "disagg-profile-handler";
            assert_eq!(decisions(&d, false, h, "prefill-decode"), 2);
            assert_eq!(decisions(&d, false, h, "decode-only"), 3);
            assert_eq!(decisions(&d, true, h, "decode-only"), 0, "no pd_decision");
            let text = d.metrics().render(&d.pool().load(), Instant::now());
            assert!(
                text.contains("llm_d_epp_disagg_decision_total{plugin_name=\"disagg-profile-handler\",plugin_type=\"disagg-profile-handler\",model_name=\"m\",decision_type=\"prefill-decode\"} 2"),
                "{text}"
            );

            // A retry's reschedule is not another decision.
            let mut t = d
                .dispatch(ApiKind::Completions, &body, meta(""), &[])
                .unwrap();
            let first = t.destinations()[0];
            t.reschedule(&[first]).unwrap();
            assert_ne!(t.destinations()[0], first);
            assert_eq!(decisions(&d, false, h, "decode-only"), 4);

            // The deprecated pd-profile-handler counts into pd_decision_total instead.
            let d = roled(
                &["prefill", "decode"],
                &PD.replace("type: disagg-profile-handler\n  parameters: {deciders: {prefill: prefix-based-pd-decider}}", "type: pd-profile-handler"),
            );
            d.dispatch(ApiKind::Completions, &body, meta(""), &[])
                .unwrap();
            let h = "pd-profile-handler";
            assert_eq!(decisions(&d, true, h, "prefill-decode"), 1);
            assert_eq!(decisions(&d, false, h, "prefill-decode"), 0);
            let text = d.metrics().render(&d.pool().load(), Instant::now());
            assert!(
                text.contains("llm_d_epp_pd_decision_total{plugin_name=\"pd-profile-handler\""),
                "{text}"
            );
        }

        #[test]
        fn a_disaggregated_pick_is_recorded_for_both_pods_at_the_owner() {
            let owners = Arc::new(FakeOwners::default());
            let d = pd().with_prefix_owners(owners.clone());
            let t =
                block_on(d.route(ApiKind::Completions, &long_prompt("m"), meta(""), &[])).unwrap();
            let prefill: SocketAddr = header(&t, PREFILLER_HEADER).unwrap().parse().unwrap();
            let records = owners.records.lock().clone();
            assert_eq!(records.len(), 1);
            assert_eq!(records[0].2, vec![t.destinations()[0], prefill]);
            // The owner's next answer credits both: the same pair is picked again, and
            // the decode pod's cached prompt now skips the prefill stage.
            let blocks = u32::try_from(records[0].1.len()).unwrap();
            *owners.answer.lock() = vec![(t.destinations()[0], blocks), (prefill, blocks)];
            let decode = t.destinations()[0];
            drop(t);
            let t = block_on(d.route(
                ApiKind::Completions,
                &long_prompt("m"),
                prefer("if-available"),
                &[],
            ))
            .unwrap();
            assert_eq!(t.destinations()[0], decode);
            assert_eq!(header(&t, PREFILLER_HEADER), None);
        }

        #[test]
        fn image_parts_send_a_chat_request_through_the_encoders() {
            let epd = "plugins:\n- type: decode-filter\n- type: encode-filter\n- type: always-disagg-multimodal-decider\n- type: disagg-profile-handler\n  parameters: {deciders: {encode: always-disagg-multimodal-decider}}\nschedulingProfiles:\n- name: decode\n  plugins: [{pluginRef: decode-filter}]\n- name: encode\n  plugins: [{pluginRef: encode-filter}]\n";
            let d = roled(&["encode", "decode"], epd);
            let chat = |content: serde_json::Value| {
                serde_json::to_vec(&serde_json::json!({"model": "m", "messages": [{"role": "user", "content": content}]})).unwrap()
            };
            let image = chat(serde_json::json!([
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
            ]));
            let t = d
                .dispatch(ApiKind::ChatCompletions, &image, meta(""), &[])
                .unwrap();
            assert!(t.request().multimodal);
            assert_eq!(t.destinations()[0], addr(1));
            assert_eq!(header(&t, ENCODERS_HEADER), Some("10.0.0.0:8000"));
            drop(t);
            let text = chat(serde_json::json!("what is a cat?"));
            let t = d
                .dispatch(ApiKind::ChatCompletions, &text, meta(""), &[])
                .unwrap();
            assert!(!t.request().multimodal);
            assert_eq!(header(&t, ENCODERS_HEADER), None);
            drop(t);
            let h = "disagg-profile-handler";
            assert_eq!(decisions(&d, false, h, "encode-decode"), 1);
            assert_eq!(decisions(&d, false, h, "decode-only"), 1);
        }
    }
}
