//! Endpoint discovery from a file: one InferencePool naming, in infermesh's extension
//! fields `models` and `pods`, the pool's served models and its pods (labels, per-pod
//! target ports), plus optional InferenceObjectives and InferenceModelRewrites. Every GIE
//! field is parsed and validated by the policy store (`parse_document_values`), so the file
//! and `infermesh apply` accept and refuse the same documents; this module handles only
//! `models` and `pods`. The file is watched (notify) and re-read when it changes; a file
//! that fails to parse or validate is reported and the previous set stays in force.
//!
//! ```yaml
//! apiVersion: inference.networking.k8s.io/v1
//! kind: InferencePool
//! metadata: {name: llama}
//! spec:
//!   targetPorts: [{number: 8000}]          # 1-8 unique ports, as in InferencePool
//!   selector: {matchLabels: {app: vllm}}   # required, as in InferencePool; pods must match it
//!   # appProtocol: http only; kubernetes.io/h2c is refused (the proxy speaks HTTP/1.1)
//! models: [meta-llama/Llama-3.1-8B-Instruct]  # optional; else read from each pod's /v1/models
//! pods:                                    # what Kubernetes would find with the selector
//! - {name: vllm-0, address: 10.0.0.1, labels: {app: vllm, llm-d.ai/role: decode}}
//! - {name: vllm-1, address: 127.0.0.1, labels: {app: vllm}, targetPorts: [{number: 18001}]}  # per-pod override
//! ---
//! apiVersion: inference.networking.x-k8s.io/v1alpha2
//! kind: InferenceObjective
//! metadata: {name: batch}
//! spec: {priority: -1, poolRef: {name: llama}}
//! ---
//! apiVersion: inference.networking.x-k8s.io/v1alpha2
//! kind: InferenceModelRewrite
//! metadata: {name: short-names}
//! spec:
//!   poolRef: {name: llama}
//!   rules:
//!   - matches: [{model: {value: llama}}]
//!     targets: [{modelRewrite: meta-llama/Llama-3.1-8B-Instruct}]
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use infermesh_raft_store::policy::{
    InvalidDocument, Kind, PolicyObject, PortNumber, accept_any_epp_config, parse_document_values,
    read_documents, validate_target_ports,
};
use serde::Deserialize;

use crate::pool_model::{Engine, PoolInput, UnknownEngine};

pub use crate::pool_model::{EndpointSpec, PoolSpec, fleet_pool};

/// The kinds an endpoints file may hold (the policy store knows more, e.g.
/// EndpointPickerConfig, which the node takes from `--config-file` instead).
const FILE_KINDS: [Kind; 3] = [
    Kind::InferencePool,
    Kind::InferenceObjective,
    Kind::InferenceModelRewrite,
];

/// Why a discovery file was rejected; the previous endpoint set stays in force.
#[derive(Debug, thiserror::Error)]
pub enum InvalidPoolFile {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The IO error.
        source: std::io::Error,
    },
    /// A document breaks the policy store's rules, or the pool's `models`/`pods` are wrong;
    /// names the document, its kind and name, and the field.
    #[error(transparent)]
    Document(#[from] InvalidDocument),
    /// A document of a kind this file does not hold.
    #[error(
        "document {document}: unsupported kind {kind:?} (expected InferencePool, InferenceObjective or InferenceModelRewrite)"
    )]
    UnsupportedKind {
        /// 1-based YAML document index.
        document: usize,
        /// The kind found.
        kind: String,
    },
    /// Zero or several InferencePool documents.
    #[error("the file must hold exactly one InferencePool document, found {0}")]
    PoolCount(usize),
}

/// The fields infermesh adds to the InferencePool document (what Kubernetes would find with
/// the selector, and the served models); everything else is GIE's and parsed by the
/// policy store.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Extension {
    #[serde(default)]
    models: Vec<String>,
    #[serde(default)]
    pods: Vec<PodDoc>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PodDoc {
    #[serde(default)]
    name: Option<String>,
    address: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    target_ports: Option<Vec<PortNumber>>,
}

/// Errors in the extension fields, in the policy store's form (document, kind, name, field).
struct PoolCtx {
    document: usize,
    name: String,
}

impl PoolCtx {
    fn err(&self, field: impl Into<String>, reason: impl Into<String>) -> InvalidPoolFile {
        InvalidPoolFile::Document(InvalidDocument {
            document: self.document,
            kind: Kind::InferencePool.to_string(),
            name: self.name.clone(),
            field: field.into(),
            reason: reason.into(),
        })
    }
}

/// Reads and validates a discovery file.
pub fn load_pool_file(path: &Path) -> Result<PoolSpec, InvalidPoolFile> {
    let text = std::fs::read_to_string(path).map_err(|source| InvalidPoolFile::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_pool(&text)
}

/// Parses and validates the text of a discovery file: the InferencePool, InferenceObjective
/// and InferenceModelRewrite documents by the policy store's rules (as `infermesh apply`
/// would), the pool's `models` and `pods` here.
pub fn parse_pool(text: &str) -> Result<PoolSpec, InvalidPoolFile> {
    let mut documents = read_documents(text)?;
    let mut extension: Option<(usize, serde_json::Value)> = None;
    for (document, value) in &mut documents {
        // A missing or non-string kind is left to the policy store, which names it.
        let Some(kind) = value.get("kind").and_then(|k| k.as_str()) else {
            continue;
        };
        if !FILE_KINDS.iter().any(|k| k.as_str() == kind) {
            return Err(InvalidPoolFile::UnsupportedKind {
                document: *document,
                kind: kind.to_owned(),
            });
        }
        if kind == Kind::InferencePool.as_str()
            && let Some(map) = value.as_object_mut()
        {
            // Out before the policy store sees the document: GIE has no such fields.
            let mut ext = serde_json::Map::new();
            for key in ["models", "pods"] {
                if let Some(v) = map.remove(key) {
                    ext.insert(key.to_owned(), v);
                }
            }
            extension = Some((*document, serde_json::Value::Object(ext)));
        }
    }
    let objects = parse_document_values(documents, &accept_any_epp_config())?;
    let mut pools = Vec::new();
    let mut objectives = HashMap::new();
    let mut rewrites = Vec::new();
    for object in objects {
        match object {
            PolicyObject::InferencePool(doc) => pools.push(doc),
            PolicyObject::InferenceObjective(doc) => {
                let priority = doc.spec.effective_priority();
                objectives.insert(doc.metadata.name, (doc.spec.pool_ref.name, priority));
            }
            PolicyObject::InferenceModelRewrite(doc) => rewrites.push(doc),
            _ => unreachable!("kinds other than FILE_KINDS were refused above"),
        }
    }
    let [pool] = <[_; 1]>::try_from(pools).map_err(|p| InvalidPoolFile::PoolCount(p.len()))?;
    // As for applied policy (`policy::derive`): objectives and rewrites apply to the pool
    // their poolRef names, so one naming another pool does nothing here.
    objectives.retain(|_, (pool_ref, _)| *pool_ref == pool.metadata.name);
    let objectives: HashMap<String, i32> =
        objectives.into_iter().map(|(k, (_, p))| (k, p)).collect();
    rewrites.retain(|r| r.spec.pool_ref.name == pool.metadata.name);
    let (document, ext) = extension.expect("a parsed InferencePool was seen above");
    let ctx = PoolCtx {
        document,
        name: pool.metadata.name.clone(),
    };
    let ext: Extension = serde_path_to_error::deserialize(ext)
        .map_err(|e| ctx.err(e.path().to_string(), e.inner().to_string()))?;
    for (i, m) in ext.models.iter().enumerate() {
        if m.is_empty() {
            return Err(ctx.err(format!("models[{i}]"), "a model name must not be empty"));
        }
    }
    let selector = &pool.spec.selector.match_labels;
    let mut endpoints = Vec::new();
    let mut seen = BTreeSet::new();
    for (i, pod) in ext.pods.into_iter().enumerate() {
        let at = |f: &str| format!("pods[{i}].{f}");
        let ip: IpAddr = pod.address.parse().map_err(|_| {
            ctx.err(
                at("address"),
                format!("{:?} is not an IP address", pod.address),
            )
        })?;
        let ports = match &pod.target_ports {
            Some(p) => {
                // The pool's own rule, so a pod may list what the pool may list.
                validate_target_ports(p.iter().map(|p| p.number))
                    .map_err(|e| ctx.err(e.field(&at("targetPorts")), e.to_string()))?;
                p
            }
            None => &pool.spec.target_ports,
        };
        if !selector.iter().all(|(k, v)| pod.labels.get(k) == Some(v)) {
            continue; // not selected by the pool, as Kubernetes would skip it
        }
        let engine = Engine::from_labels(&pod.labels)
            .map_err(|e @ UnknownEngine(_)| ctx.err(at("labels"), e.to_string()))?;
        let name = pod.name.unwrap_or_else(|| format!("pod-{i}"));
        for port in ports {
            // Validated above: 1..=65535.
            let port = u16::try_from(port.number).expect("a validated port fits u16");
            let address = SocketAddr::new(ip, port);
            if !seen.insert(address) {
                return Err(ctx.err(at("address"), format!("endpoint {address} is listed twice")));
            }
            endpoints.push(EndpointSpec {
                address,
                pod: name.clone(),
                labels: pod.labels.clone(),
                engine,
            });
        }
    }
    Ok(PoolSpec {
        name: pool.metadata.name,
        endpoints,
        models: ext.models,
        objectives,
        rewrites: Some(rewrites),
    })
}

/// Re-reads a discovery file: `Some(new)` when it changed (and `last` becomes it),
/// `None` when unchanged, an error (and `last` untouched) when it is invalid.
pub fn reload(path: &Path, last: &mut PoolSpec) -> Result<Option<PoolSpec>, InvalidPoolFile> {
    let spec = load_pool_file(path)?;
    if spec == *last {
        return Ok(None);
    }
    *last = spec.clone();
    Ok(Some(spec))
}

/// Watches a discovery file and sends each new valid content to the pool task; an invalid
/// file is logged with its error and ignored (the previous set stays). The returned
/// watcher must be kept alive.
pub fn watch_pool_file(
    path: PathBuf,
    last: PoolSpec,
    tx: tokio::sync::mpsc::Sender<PoolInput>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> notify::Result<(notify::RecommendedWatcher, tokio::task::JoinHandle<()>)> {
    watch_file(path, last, load_pool_file, tx, shutdown)
}

/// Watches `path` and sends each new valid content `load` reads to the pool task; a
/// content `load` refuses is logged and ignored (the previous set stays). The returned
/// watcher must be kept alive.
pub fn watch_file<E: std::fmt::Display + Send + 'static>(
    path: PathBuf,
    mut last: PoolSpec,
    load: impl Fn(&Path) -> Result<PoolSpec, E> + Send + 'static,
    tx: tokio::sync::mpsc::Sender<PoolInput>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> notify::Result<(notify::RecommendedWatcher, tokio::task::JoinHandle<()>)> {
    use notify::Watcher;
    let (ev_tx, mut ev_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let file_name = path.file_name().map(|n| n.to_owned());
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if let Ok(ev) = ev
            && ev
                .paths
                .iter()
                .any(|p| p.file_name() == file_name.as_deref())
        {
            let _ = ev_tx.send(());
        }
    })?;
    // Watch the directory: editors and `kubectl cp`-style tools replace files by rename.
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    watcher.watch(&dir, notify::RecursiveMode::NonRecursive)?;
    let task = tokio::spawn(async move {
        loop {
            tokio::select! {
                ev = ev_rx.recv() => if ev.is_none() { break },
                _ = shutdown.wait_for(|s| *s) => break,
            }
            // Let a burst of events (truncate + write + rename) settle, then read once.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            while ev_rx.try_recv().is_ok() {}
            match load(&path) {
                Ok(spec) if spec == last => {}
                Ok(spec) => {
                    tracing::info!(file = %path.display(), endpoints = spec.endpoints.len(), "endpoints file reloaded");
                    last = spec.clone();
                    if tx.send(PoolInput::Spec(spec)).await.is_err() {
                        break;
                    }
                }
                Err(e) => {
                    tracing::error!(file = %path.display(), error = %e, "endpoints file rejected; keeping the previous endpoint set");
                }
            }
        }
    });
    Ok((watcher, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
apiVersion: inference.networking.k8s.io/v1
kind: InferencePool
metadata: {name: llama}
spec:
  targetPorts: [{number: 8000}, {number: 8001}]
  selector: {matchLabels: {app: vllm}}
models: [meta-llama/Llama-3.1-8B-Instruct]
pods:
- {name: a, address: 10.0.0.1, labels: {app: vllm, llm-d.ai/role: decode}}
- {name: b, address: 127.0.0.1, labels: {app: vllm, llm-d.ai/engine-type: sglang}, targetPorts: [{number: 18001}]}
- {name: c, address: 10.0.0.3, labels: {app: other}}
---
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceObjective
metadata: {name: batch}
spec: {priority: -1, poolRef: {name: llama}}
---
"#;

    #[test]
    fn parses_pool_pods_ports_and_objectives() {
        let p = parse_pool(FILE).unwrap();
        assert_eq!(p.name, "llama");
        let addrs: Vec<String> = p.endpoints.iter().map(|e| e.address.to_string()).collect();
        assert_eq!(addrs, ["10.0.0.1:8000", "10.0.0.1:8001", "127.0.0.1:18001"]);
        assert_eq!(p.endpoints[2].engine, Engine::Sglang);
        assert_eq!(p.endpoints[0].labels["llm-d.ai/role"], "decode");
        assert_eq!(p.models, ["meta-llama/Llama-3.1-8B-Instruct"]);
        assert_eq!(p.objectives["batch"], -1);
    }

    #[test]
    fn model_rewrites_in_the_file_are_validated_like_policy() {
        let rewrite = "apiVersion: inference.networking.x-k8s.io/v1alpha2\n\
            kind: InferenceModelRewrite\nmetadata: {name: alias}\nspec:\n  \
            poolRef: {name: llama}\n  rules:\n  - matches: [{model: {value: short}}]\n    \
            targets: [{modelRewrite: meta-llama/Llama-3.1-8B-Instruct}]\n";
        let p = parse_pool(&format!("{FILE}{rewrite}")).unwrap();
        let docs = p.rewrites.expect("the file owns the rewrites");
        assert_eq!(docs.len(), 1);
        assert_eq!(docs[0].metadata.name, "alias");
        assert_eq!(parse_pool(FILE).unwrap().rewrites, Some(Vec::new()));
        // The policy store's rules: a rule needs at least one target.
        let bad = rewrite.replace(
            "    targets: [{modelRewrite: meta-llama/Llama-3.1-8B-Instruct}]\n",
            "    targets: []\n",
        );
        let e = parse_pool(&format!("{FILE}{bad}")).unwrap_err().to_string();
        assert!(
            e.starts_with("document 3 (InferenceModelRewrite \"alias\")"),
            "{e}"
        );
        assert!(e.contains("target"), "{e}");
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (FILE.replace("10.0.0.1", "not-an-ip"), "pods[0].address"),
            (
                FILE.replace(
                    "{number: 8000}, {number: 8001}",
                    "{number: 8000}, {number: 8000}",
                ),
                "spec.targetPorts[1].number",
            ),
            (
                FILE.replace("targetPorts: [{number: 18001}]", "targetPorts: []"),
                "pods[1].targetPorts",
            ),
            (
                FILE.replace(
                    "metadata: {name: llama}",
                    "metadata: {name: llama}\nbogus: 1",
                ),
                "bogus",
            ),
            (
                FILE.replace("engine-type: sglang", "engine-type: tgi"),
                "pods[1].labels",
            ),
            (
                FILE.replace("{number: 18001}", "{number: 99999}"),
                "pods[1].targetPorts[0].number",
            ),
        ];
        for (text, want) in cases {
            let err = parse_pool(&text).unwrap_err().to_string();
            assert!(err.contains(want), "{want}: {err}");
        }
        assert!(matches!(
            parse_pool("kind: Deployment\n").unwrap_err(),
            InvalidPoolFile::UnsupportedKind { .. }
        ));
        let objective_only = "apiVersion: inference.networking.x-k8s.io/v1alpha2\n\
            kind: InferenceObjective\nmetadata: {name: x}\nspec: {poolRef: {name: llama}}\n";
        assert!(matches!(
            parse_pool(objective_only).unwrap_err(),
            InvalidPoolFile::PoolCount(0)
        ));
        let e = parse_pool(&FILE.replace("{name: batch}", "{name: batch}\nmodels: [x]"));
        assert!(
            e.unwrap_err().to_string().contains("models"),
            "only the pool has models"
        );
    }

    /// A GIE-only pool (no `models`/`pods`), so the same text is a valid endpoints file and
    /// a valid `infermesh apply`.
    const GIE_POOL: &str = "apiVersion: inference.networking.k8s.io/v1\n\
        kind: InferencePool\nmetadata: {name: llama}\nspec:\n  \
        selector: {matchLabels: {app: vllm}}\n  targetPorts: [{number: 8000}]\n";

    const OBJECTIVE: &str = "apiVersion: inference.networking.x-k8s.io/v1alpha2\n\
        kind: InferenceObjective\nmetadata: {name: batch}\n\
        spec: {priority: -1, poolRef: {name: llama}}\n";

    #[test]
    fn the_file_and_apply_accept_and_refuse_the_same_documents() {
        use infermesh_raft_store::policy::{accept_any_epp_config, parse_documents};
        let nine: Vec<String> = (1..=9).map(|p| format!("{{number: {p}}}")).collect();
        let nine = format!("targetPorts: [{}]", nine.join(", "));
        let pool = |from: &str, to: &str| {
            assert!(GIE_POOL.contains(from), "{from}");
            GIE_POOL.replace(from, to)
        };
        let with_objective = |o: &str| format!("{GIE_POOL}---\n{o}");
        // (case, text, the field named when refused; None = accepted)
        let cases: Vec<(&str, String, Option<&str>)> = vec![
            ("plain pool", GIE_POOL.to_owned(), None),
            ("pool and objective", with_objective(OBJECTIVE), None),
            (
                "http spelled out",
                pool("targetPorts:", "appProtocol: http\n  targetPorts:"),
                None,
            ),
            (
                "eight ports",
                pool(
                    "targetPorts: [{number: 8000}]",
                    &nine.replace(", {number: 9}", ""),
                ),
                None,
            ),
            (
                "missing selector",
                pool("  selector: {matchLabels: {app: vllm}}\n", ""),
                Some("missing field `selector`"),
            ),
            (
                "empty selector",
                pool("{app: vllm}", "{}"),
                Some("spec.selector.matchLabels"),
            ),
            (
                "nine ports",
                pool("targetPorts: [{number: 8000}]", &nine),
                Some("spec.targetPorts"),
            ),
            (
                "port 0",
                pool("8000", "0"),
                Some("spec.targetPorts[0].number"),
            ),
            (
                "port 70000",
                pool("8000", "70000"),
                Some("spec.targetPorts[0].number"),
            ),
            (
                "duplicate port",
                pool("{number: 8000}", "{number: 8000}, {number: 8000}"),
                Some("spec.targetPorts[1].number"),
            ),
            (
                "objective without poolRef",
                with_objective(&OBJECTIVE.replace(", poolRef: {name: llama}", "")),
                Some("missing field `poolRef`"),
            ),
            (
                "unknown field",
                pool("targetPorts:", "replicas: 2\n  targetPorts:"),
                Some("unknown field `replicas`"),
            ),
            (
                "h2c",
                pool(
                    "targetPorts:",
                    "appProtocol: kubernetes.io/h2c\n  targetPorts:",
                ),
                Some("spec.appProtocol"),
            ),
            (
                "missing apiVersion",
                pool("apiVersion: inference.networking.k8s.io/v1\n", ""),
                Some("apiVersion"),
            ),
            (
                "upper-case name",
                pool("{name: llama}", "{name: Llama}"),
                Some("metadata.name"),
            ),
        ];
        for (case, text, refused_at) in cases {
            let file = parse_pool(&text);
            let apply = parse_documents(&text, &accept_any_epp_config());
            match (&file, &apply, refused_at) {
                (Ok(_), Ok(_), None) => {}
                (Err(InvalidPoolFile::Document(f)), Err(a), Some(field)) => {
                    // The same error, not merely both refusing.
                    assert_eq!(f, a, "{case}");
                    assert!(
                        a.field.contains(field) || a.reason.contains(field),
                        "{case}: {a}"
                    );
                    assert!(f.to_string().contains(field), "{case}: {f}");
                }
                _ => panic!("{case}: the file gave {file:?}, apply gave {apply:?}"),
            }
        }
    }

    #[test]
    fn pod_ports_follow_the_pools_rule() {
        let pod = |ports: &str| {
            format!(
                "{GIE_POOL}pods:\n- {{address: 10.0.0.1, labels: {{app: vllm}}, targetPorts: {ports}}}\n"
            )
        };
        let nine: Vec<String> = (1..=9).map(|p| format!("{{number: {p}}}")).collect();
        let cases = [
            (
                format!("[{}]", nine.join(", ")),
                "pods[0].targetPorts",
                "must list 1 to 8 ports, got 9",
            ),
            (
                "[]".to_owned(),
                "pods[0].targetPorts",
                "must list 1 to 8 ports, got 0",
            ),
            (
                "[{number: 0}]".to_owned(),
                "pods[0].targetPorts[0].number",
                "0 is not a port",
            ),
            (
                "[{number: 7}, {number: 7}]".to_owned(),
                "pods[0].targetPorts[1].number",
                "listed twice",
            ),
        ];
        for (ports, field, reason) in cases {
            let InvalidPoolFile::Document(e) = parse_pool(&pod(&ports)).unwrap_err() else {
                panic!("{ports}: not a document error");
            };
            assert_eq!(
                (e.document, e.kind.as_str(), e.field.as_str()),
                (1, "InferencePool", field)
            );
            assert!(e.reason.contains(reason), "{ports}: {e}");
        }
        let ok = parse_pool(&pod("[{number: 1}, {number: 65535}]")).unwrap();
        assert_eq!(ok.endpoints.len(), 2);
    }

    #[test]
    fn objectives_and_rewrites_for_another_pool_do_not_apply() {
        let other = OBJECTIVE.replace("{name: llama}", "{name: other}");
        let p = parse_pool(&format!("{GIE_POOL}---\n{other}")).unwrap();
        assert!(p.objectives.is_empty(), "{:?}", p.objectives);
        let p = parse_pool(&format!("{GIE_POOL}---\n{OBJECTIVE}")).unwrap();
        assert_eq!(p.objectives["batch"], -1);
    }
}

#[cfg(test)]
mod reload_tests {
    use std::time::Duration;

    use super::*;
    use crate::pool_task::PoolInput;

    fn pool_with(ports: &[u16]) -> String {
        let pods: Vec<String> = ports
            .iter()
            .map(|p| {
                format!("- {{address: 127.0.0.1, labels: {{app: vllm}}, targetPorts: [{{number: {p}}}]}}")
            })
            .collect();
        format!(
            "apiVersion: inference.networking.k8s.io/v1\nkind: InferencePool\nmetadata: {{name: t}}\n\
             spec: {{selector: {{matchLabels: {{app: vllm}}}}, targetPorts: [{{number: 1}}]}}\npods:\n{}\n",
            pods.join("\n")
        )
    }

    async fn next_spec(rx: &mut tokio::sync::mpsc::Receiver<PoolInput>) -> PoolSpec {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some(PoolInput::Spec(s))) => s,
            other => panic!("expected a reloaded pool within 10 s, got {other:?}"),
        }
    }

    fn ports(s: &PoolSpec) -> Vec<u16> {
        s.endpoints.iter().map(|e| e.address.port()).collect()
    }

    #[tokio::test]
    async fn reloads_when_the_file_is_rewritten_or_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pool.yaml");
        std::fs::write(&path, pool_with(&[1001])).unwrap();
        let initial = load_pool_file(&path).unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::channel(8);
        let (_sd_tx, sd_rx) = tokio::sync::watch::channel(false);
        let (_watcher, _task) = watch_pool_file(path.clone(), initial, tx, sd_rx).unwrap();

        std::fs::write(&path, pool_with(&[1001, 1002])).unwrap();
        assert_eq!(ports(&next_spec(&mut rx).await), [1001, 1002]);

        let tmp = dir.path().join("pool.yaml.tmp");
        std::fs::write(&tmp, pool_with(&[1003])).unwrap();
        std::fs::rename(&tmp, &path).unwrap(); // replaced by rename, as editors do
        assert_eq!(ports(&next_spec(&mut rx).await), [1003]);
    }

    #[test]
    fn an_invalid_edit_keeps_the_previous_set() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pool.yaml");
        std::fs::write(&path, pool_with(&[1001])).unwrap();
        let mut last = load_pool_file(&path).unwrap();
        assert!(
            reload(&path, &mut last).unwrap().is_none(),
            "unchanged file"
        );
        let bad = pool_with(&[1001]).replace("targetPorts: [{number: 1}]", "targetPorts: []");
        std::fs::write(&path, bad).unwrap();
        let err = reload(&path, &mut last).unwrap_err();
        assert!(err.to_string().contains("spec.targetPorts"), "{err}");
        assert_eq!(ports(&last), [1001], "the previous set stays");
        std::fs::write(&path, pool_with(&[1002])).unwrap();
        assert_eq!(ports(&reload(&path, &mut last).unwrap().unwrap()), [1002]);
        assert_eq!(ports(&last), [1002]);
    }

    #[test]
    fn the_example_file_is_valid() {
        let p = parse_pool(include_str!("../../deploy/examples/pool.yaml")).unwrap();
        assert_eq!(p.endpoints.len(), 3);
        assert_eq!(p.objectives["batch"], -1);
        assert_eq!(p.endpoints[2].engine, Engine::Sglang);
    }
}
