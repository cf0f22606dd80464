//! OpenTelemetry tracing end to end on loopback: an in-process OTLP collector, a node with
//! tracing on (as `--tracing` sets it up) and a sharing mesh, and a request through the
//! proxy that carries a W3C `traceparent`. The collector must receive the request's spans
//! in the caller's trace — the request span as the child of the caller's span, and parse,
//! owner lookup, schedule and forward under it — while a request without a sampled parent
//! and a ratio of 0 exports nothing.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use infermesh_gossip::{ClusterKey, MeshConfig};
use infermesh_node::app::App;
use infermesh_node::config::NodeConfig;
use infermesh_node::discovery::fleet_pool;
use infermesh_node::mesh::MeshOptions;
use infermesh_node::telemetry::{self, TracingOptions};
use infermesh_node::upstream::http_client;
use infermesh_scheduler::ResolvedConfig;
use infermesh_sim::{EngineProfile, Fleet, FleetConfig};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;
use support::post;

#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Span>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            for ss in rs.scope_spans {
                spans.extend(ss.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

async fn start_collector() -> (SocketAddr, Collector) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let c = Collector::default();
    let svc = TraceServiceServer::new(c.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (addr, c)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_spans_reach_the_collector_in_the_callers_trace() {
    let (collector_addr, collector) = start_collector().await;
    let env: HashMap<String, String> = [
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(),
            format!("http://{collector_addr}"),
        ),
        ("OTEL_SERVICE_NAME".to_owned(), "infermesh-test".to_owned()),
        // Roots are never sampled: only a caller's sampled trace is followed.
        ("OTEL_TRACES_SAMPLER_ARG".to_owned(), "0".to_owned()),
    ]
    .into();
    let opts = TracingOptions::from_env(&env).unwrap();
    let telemetry = telemetry::init("warn", Some(&opts)).expect("telemetry starts");

    let mut fc = FleetConfig::new(2);
    fc.profile = EngineProfile::instant();
    let model = fc.model.clone();
    let fleet = Fleet::start(fc).await.expect("pods");
    let pods = fleet.addrs();
    let mut cfg = NodeConfig::local(fleet_pool(&pods, &model), ResolvedConfig::builtin_default())
        .expect("node config");
    cfg.mesh = Some(MeshOptions {
        config: MeshConfig::loopback(
            "trace-a",
            ClusterKey::new(b"tracing-test-cluster-key".to_vec()).unwrap(),
        ),
        sharing: true,
    });
    let app = App::start(cfg).await.expect("node");
    assert!(app.wait_ready(2, Duration::from_secs(20)).await);
    let client = http_client(Duration::from_secs(5));
    let proxy = app.proxy_addr.unwrap();
    let body =
        serde_json::json!({"model": model, "prompt": "trace me ".repeat(40), "max_tokens": 4})
            .to_string();

    // No parent, ratio 0: nothing is exported.
    let r = post(&client, proxy, "/v1/completions", body.clone(), &[]).await;
    assert_eq!(r.status, 200);
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent_span = "00f067aa0ba902b7";
    let traceparent = format!("00-{trace_id}-{parent_span}-01");
    let r = post(
        &client,
        proxy,
        "/v1/completions",
        body,
        &[("traceparent", traceparent.as_str())],
    )
    .await;
    assert_eq!(r.status, 200);

    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let spans = loop {
        telemetry.flush();
        let spans = collector.spans.lock().unwrap().clone();
        let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
        if [
            "infermesh.request",
            "parse",
            "prefix.lookup",
            "schedule",
            "forward",
        ]
        .iter()
        .all(|n| names.contains(n))
        {
            break spans;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "spans never arrived: {names:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for s in &spans {
        assert_eq!(
            hex(&s.trace_id),
            trace_id,
            "span {} is in the caller's trace (an unsampled request leaked?)",
            s.name
        );
    }
    let by_name = |n: &str| spans.iter().find(|s| s.name == n).unwrap();
    let request = by_name("infermesh.request");
    assert_eq!(hex(&request.parent_span_id), parent_span);
    for child in ["parse", "prefix.lookup", "schedule", "forward"] {
        assert_eq!(
            by_name(child).parent_span_id,
            request.span_id,
            "{child} is a child of the request span"
        );
    }
    let schedule = by_name("schedule");
    let endpoint = schedule
        .attributes
        .iter()
        .find(|a| a.key == "endpoint")
        .and_then(|a| a.value.as_ref())
        .map(|v| format!("{v:?}"))
        .unwrap_or_default();
    assert!(
        pods.iter().any(|p| endpoint.contains(&p.to_string())),
        "schedule span names the picked pod: {endpoint}"
    );
    app.shutdown(Duration::from_secs(1)).await;
    fleet.shutdown().await;
    telemetry.shutdown();
}
