//! Logs and OpenTelemetry traces. Tracing is off unless `--tracing` is given; then spans of
//! the request path (target [`OTEL_TARGET`]: the request, parse, flow-control wait, owner
//! lookup, schedule and forward) go by OTLP/gRPC to `OTEL_EXPORTER_OTLP_ENDPOINT`, with
//! llm-d's environment: `OTEL_SERVICE_NAME`, `OTEL_TRACES_SAMPLER`
//! (`parentbased_traceidratio`, `always_on`, `parentbased_always_on`) and
//! `OTEL_TRACES_SAMPLER_ARG` (0.1). The W3C `traceparent` of an incoming request becomes the
//! request span's parent, and the pod gets the forward span's own `traceparent`.
//!
//! The request-path spans are at TRACE level under their own target, so with tracing off
//! no layer is interested and they cost a disabled callsite check.

use std::collections::HashMap;

use http::HeaderMap;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// The target of the request-path spans exported as traces.
pub const OTEL_TARGET: &str = "infermesh::otel";

/// Why tracing could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// An `OTEL_*` variable holds a value infermesh does not take.
    #[error("{var}={value:?}: {reason}")]
    Env {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// The OTLP exporter could not be built.
    #[error("OTLP exporter: {0}")]
    Exporter(String),
}

/// Where and how traces go, read from llm-d's `OTEL_*` variables.
#[derive(Debug, Clone, PartialEq)]
pub struct TracingOptions {
    /// OTLP/gRPC collector URL.
    pub endpoint: String,
    /// `service.name`.
    pub service_name: String,
    /// Share of root traces sampled (a sampled parent is always followed).
    pub ratio: f64,
    /// Sample every root trace (`always_on`, `parentbased_always_on`).
    pub parent_based: bool,
}

impl TracingOptions {
    /// Reads the options from `env` (llm-d's defaults where a variable is unset).
    pub fn from_env(env: &HashMap<String, String>) -> Result<TracingOptions, TelemetryError> {
        let get = |k: &str| env.get(k).filter(|v| !v.is_empty()).cloned();
        if let Some(e) = get("OTEL_TRACES_EXPORTER")
            && e != "otlp"
        {
            return Err(TelemetryError::Env {
                var: "OTEL_TRACES_EXPORTER",
                value: e,
                reason: "infermesh exports traces over OTLP only (\"otlp\")",
            });
        }
        let sampler =
            get("OTEL_TRACES_SAMPLER").unwrap_or_else(|| "parentbased_traceidratio".into());
        let (ratio, parent_based) = match sampler.as_str() {
            "parentbased_traceidratio" | "traceidratio" => {
                let arg = get("OTEL_TRACES_SAMPLER_ARG").unwrap_or_else(|| "0.1".into());
                let r: f64 = arg.parse().map_err(|_| TelemetryError::Env {
                    var: "OTEL_TRACES_SAMPLER_ARG",
                    value: arg.clone(),
                    reason: "must be a number in [0, 1]",
                })?;
                if !(0.0..=1.0).contains(&r) {
                    return Err(TelemetryError::Env {
                        var: "OTEL_TRACES_SAMPLER_ARG",
                        value: arg,
                        reason: "must be a number in [0, 1]",
                    });
                }
                (r, sampler.starts_with("parentbased"))
            }
            "always_on" => (1.0, false),
            "parentbased_always_on" => (1.0, true),
            _ => {
                return Err(TelemetryError::Env {
                    var: "OTEL_TRACES_SAMPLER",
                    value: sampler,
                    reason: "supported: parentbased_traceidratio, traceidratio, always_on, parentbased_always_on",
                });
            }
        };
        Ok(TracingOptions {
            endpoint: get("OTEL_EXPORTER_OTLP_ENDPOINT")
                .unwrap_or_else(|| "http://localhost:4317".into()),
            service_name: get("OTEL_SERVICE_NAME").unwrap_or_else(|| "infermesh".into()),
            ratio,
            parent_based,
        })
    }
}

/// The running telemetry: flushes and stops the exporter when shut down.
#[derive(Debug, Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports every finished span now (tests; shutdown).
    pub fn flush(&self) {
        if let Some(p) = &self.provider {
            let _ = p.force_flush();
        }
    }

    /// Flushes and stops the exporter.
    pub fn shutdown(self) {
        if let Some(p) = self.provider {
            let _ = p.shutdown();
        }
    }
}

/// Installs the global subscriber: logs to stderr at `default_level` (or `RUST_LOG`), and
/// with `tracing`, the OTLP exporter. Must run inside a Tokio runtime when tracing is on
/// (the gRPC channel's worker is spawned there). A second call keeps the first subscriber.
pub fn init(
    default_level: &str,
    tracing: Option<&TracingOptions>,
) -> Result<Telemetry, TelemetryError> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(filter);
    let Some(opts) = tracing else {
        let _ = tracing_subscriber::registry().with(fmt).try_init();
        return Ok(Telemetry::default());
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(opts.endpoint.clone())
        .build()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    let root = Sampler::TraceIdRatioBased(opts.ratio);
    let sampler = if opts.parent_based {
        Sampler::ParentBased(Box::new(root))
    } else {
        root
    };
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(sampler)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(opts.service_name.clone())
                .build(),
        )
        .build();
    let tracer = provider.tracer("infermesh");
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(
            tracing_subscriber::filter::Targets::new()
                .with_target(OTEL_TARGET, tracing::Level::TRACE),
        );
    let _ = tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init();
    Ok(Telemetry {
        provider: Some(provider),
    })
}

struct HeaderRead<'a>(&'a HeaderMap);

impl Extractor for HeaderRead<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct HeaderWrite<'a>(&'a mut HeaderMap);

impl Injector for HeaderWrite<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            http::HeaderName::try_from(key),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(k, v);
        }
    }
}

/// Makes the caller's W3C trace context (`traceparent`, `tracestate`) the parent of `span`.
pub fn adopt_parent(span: &tracing::Span, headers: &HeaderMap) {
    if span.is_disabled() || !headers.contains_key("traceparent") {
        return;
    }
    let cx = TraceContextPropagator::new().extract(&HeaderRead(headers));
    let _ = span.set_parent(cx);
}

/// [`adopt_parent`] from header pairs (ext_proc's header list).
pub fn adopt_parent_from<'a>(
    span: &tracing::Span,
    headers: impl IntoIterator<Item = (&'a str, &'a str)>,
) {
    if span.is_disabled() {
        return;
    }
    let mut map = HeaderMap::new();
    for (k, v) in headers {
        if (k == "traceparent" || k == "tracestate")
            && let (Ok(k), Ok(v)) = (
                http::HeaderName::try_from(k),
                http::HeaderValue::from_str(v),
            )
        {
            map.insert(k, v);
        }
    }
    adopt_parent(span, &map);
}

/// Writes `span`'s trace context into `headers` (the pod continues the trace).
pub fn inject(span: &tracing::Span, headers: &mut HeaderMap) {
    if span.is_disabled() {
        return;
    }
    let cx = span.context();
    TraceContextPropagator::new().inject_context(&cx, &mut HeaderWrite(headers));
}

/// `span`'s `traceparent` value, when it is recorded.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let mut h = HeaderMap::new();
    inject(span, &mut h);
    h.get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn llm_d_defaults_and_refusals() {
        let d = TracingOptions::from_env(&env(&[])).unwrap();
        assert_eq!(d.endpoint, "http://localhost:4317");
        assert_eq!(d.service_name, "infermesh");
        assert_eq!((d.ratio, d.parent_based), (0.1, true));
        let on = TracingOptions::from_env(&env(&[("OTEL_TRACES_SAMPLER", "always_on")])).unwrap();
        assert_eq!((on.ratio, on.parent_based), (1.0, false));
        for (k, v, var) in [
            (
                "OTEL_TRACES_SAMPLER",
                "jaeger_remote",
                "OTEL_TRACES_SAMPLER",
            ),
            ("OTEL_TRACES_SAMPLER_ARG", "2", "OTEL_TRACES_SAMPLER_ARG"),
            ("OTEL_TRACES_SAMPLER_ARG", "half", "OTEL_TRACES_SAMPLER_ARG"),
            ("OTEL_TRACES_EXPORTER", "console", "OTEL_TRACES_EXPORTER"),
        ] {
            let e = TracingOptions::from_env(&env(&[(k, v)])).unwrap_err();
            assert!(e.to_string().starts_with(var), "{e}");
        }
    }
}
