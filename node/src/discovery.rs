//! Endpoint discovery from a file: an InferencePool-like YAML naming the pool's pods,
//! their labels and target ports, plus optional InferenceObjectives and
//! InferenceModelRewrites (validated by the policy store's own rules). The file is watched
//! (notify) and re-read when it changes; a file that fails to parse or validate is
//! reported and the previous set stays in force.
//!
//! ```yaml
//! apiVersion: inference.networking.k8s.io/v1
//! kind: InferencePool
//! metadata: {name: llama}
//! spec:
//!   targetPorts: [{number: 8000}]          # 1-8 unique ports, as in InferencePool
//!   selector: {matchLabels: {app: vllm}}   # optional; pods must match it
//! models: [meta-llama/Llama-3.1-8B-Instruct]  # optional; else read from each pod's /v1/models
//! pods:                                    # what Kubernetes would find with the selector
//! - {name: vllm-0, address: 10.0.0.1, labels: {app: vllm, llm-d.ai/role: decode}}
//! - {name: vllm-1, address: 127.0.0.1, targetPorts: [{number: 18001}]}  # per-pod override
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

use serde::Deserialize;

use crate::pool_model::{Engine, PoolInput, UnknownEngine};

pub use crate::pool_model::{EndpointSpec, PoolSpec, fleet_pool};

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
    /// YAML syntax error or a field of the wrong shape.
    #[error("document {document}: {path}: {message}")]
    Yaml {
        /// 1-based YAML document index.
        document: usize,
        /// Field path, e.g. `pods[2].targetPorts[0].number`.
        path: String,
        /// Parser message (with line and column).
        message: String,
    },
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
    /// A semantic error at a named field.
    #[error("{field}: {reason}")]
    Field {
        /// Field path.
        field: String,
        /// What is wrong.
        reason: String,
    },
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Header {
    kind: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PoolDoc {
    #[allow(dead_code)]
    api_version: Option<String>,
    #[allow(dead_code)]
    kind: String,
    #[serde(default)]
    metadata: Metadata,
    spec: PoolSpecDoc,
    #[serde(default)]
    models: Vec<String>,
    #[serde(default)]
    pods: Vec<PodDoc>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Metadata {
    #[serde(default)]
    name: String,
    #[allow(dead_code)]
    #[serde(default)]
    namespace: Option<String>,
    #[allow(dead_code)]
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PoolSpecDoc {
    target_ports: Vec<PortDoc>,
    #[serde(default)]
    selector: Option<Selector>,
    #[serde(default)]
    app_protocol: Option<String>,
    #[allow(dead_code)]
    #[serde(default)]
    endpoint_picker_ref: Option<serde_yaml_ng::Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Selector {
    #[serde(default)]
    match_labels: BTreeMap<String, String>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(deny_unknown_fields)]
struct PortDoc {
    number: u16,
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
    target_ports: Option<Vec<PortDoc>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ObjectiveDoc {
    #[allow(dead_code)]
    api_version: Option<String>,
    #[allow(dead_code)]
    kind: String,
    metadata: Metadata,
    spec: ObjectiveSpecDoc,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ObjectiveSpecDoc {
    #[serde(default)]
    priority: Option<i32>,
    #[allow(dead_code)]
    #[serde(default)]
    pool_ref: Option<serde_yaml_ng::Value>,
}

/// An InferenceModelRewrite, parsed and validated by the policy store's own rules, so the
/// file and `infermesh apply` accept and refuse the same documents.
fn rewrite_doc(
    document: usize,
    value: &serde_yaml_ng::Value,
) -> Result<crate::pool_model::RewriteDoc, InvalidPoolFile> {
    use infermesh_raft_store::policy::{PolicyObject, accept_any_epp_config, parse_documents};
    let text = serde_yaml_ng::to_string(value).expect("a parsed YAML value serializes");
    let object = parse_documents(&text, &accept_any_epp_config())
        .map_err(|e| field(format!("document {document}"), e.to_string()))?;
    match object.into_iter().next() {
        Some(PolicyObject::InferenceModelRewrite(doc)) => Ok(doc),
        _ => unreachable!("the document's kind is InferenceModelRewrite"),
    }
}

fn field(field: impl Into<String>, reason: impl Into<String>) -> InvalidPoolFile {
    InvalidPoolFile::Field {
        field: field.into(),
        reason: reason.into(),
    }
}

fn from_doc<T: serde::de::DeserializeOwned>(
    document: usize,
    value: serde_yaml_ng::Value,
) -> Result<T, InvalidPoolFile> {
    serde_path_to_error::deserialize(value).map_err(|e| InvalidPoolFile::Yaml {
        document,
        path: e.path().to_string(),
        message: e.into_inner().to_string(),
    })
}

/// Reads and validates a discovery file.
pub fn load_pool_file(path: &Path) -> Result<PoolSpec, InvalidPoolFile> {
    let text = std::fs::read_to_string(path).map_err(|source| InvalidPoolFile::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_pool(&text)
}

/// Parses and validates the text of a discovery file.
pub fn parse_pool(text: &str) -> Result<PoolSpec, InvalidPoolFile> {
    let mut pool: Option<PoolDoc> = None;
    let mut pools = 0;
    let mut objectives = HashMap::new();
    let mut rewrites = Vec::new();
    for (i, de) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let document = i + 1;
        let value = serde_yaml_ng::Value::deserialize(de).map_err(|e| InvalidPoolFile::Yaml {
            document,
            path: ".".into(),
            message: e.to_string(),
        })?;
        if value.is_null() {
            continue; // an empty document (e.g. a trailing `---`)
        }
        let header: Header = from_doc(document, value.clone())?;
        match header.kind.as_str() {
            "InferencePool" => {
                pools += 1;
                pool = Some(from_doc(document, value)?);
            }
            "InferenceObjective" => {
                let doc: ObjectiveDoc = from_doc(document, value)?;
                if doc.metadata.name.is_empty() {
                    return Err(field(
                        format!("document {document}: metadata.name"),
                        "an InferenceObjective needs a name",
                    ));
                }
                objectives.insert(doc.metadata.name, doc.spec.priority.unwrap_or(0));
            }
            "InferenceModelRewrite" => rewrites.push(rewrite_doc(document, &value)?),
            other => {
                return Err(InvalidPoolFile::UnsupportedKind {
                    document,
                    kind: other.to_owned(),
                });
            }
        }
    }
    if pools != 1 {
        return Err(InvalidPoolFile::PoolCount(pools));
    }
    let pool = pool.expect("one pool counted");
    validate_ports("spec.targetPorts", &pool.spec.target_ports)?;
    if let Some(proto) = &pool.spec.app_protocol
        && proto != "http"
    {
        return Err(field(
            "spec.appProtocol",
            format!("{proto:?} is not supported (only \"http\")"),
        ));
    }
    let selector = pool
        .spec
        .selector
        .map(|s| s.match_labels)
        .unwrap_or_default();
    let mut endpoints = Vec::new();
    let mut seen = BTreeSet::new();
    for (i, pod) in pool.pods.into_iter().enumerate() {
        let at = |f: &str| format!("pods[{i}].{f}");
        let ip: IpAddr = pod.address.parse().map_err(|_| {
            field(
                at("address"),
                format!("{:?} is not an IP address", pod.address),
            )
        })?;
        if !selector.iter().all(|(k, v)| pod.labels.get(k) == Some(v)) {
            continue; // not selected by the pool, as Kubernetes would skip it
        }
        let engine = Engine::from_labels(&pod.labels).map_err(|UnknownEngine(e)| {
            field(
                at("labels"),
                format!("unknown engine type {e:?} (known: vllm, sglang)"),
            )
        })?;
        let ports = match &pod.target_ports {
            Some(p) => {
                validate_ports(&at("targetPorts"), p)?;
                p.clone()
            }
            None => pool.spec.target_ports.clone(),
        };
        let name = pod.name.unwrap_or_else(|| format!("pod-{i}"));
        for port in ports {
            let address = SocketAddr::new(ip, port.number);
            if !seen.insert(address) {
                return Err(field(
                    at("address"),
                    format!("endpoint {address} is listed twice"),
                ));
            }
            endpoints.push(EndpointSpec {
                address,
                pod: name.clone(),
                labels: pod.labels.clone(),
                engine,
            });
        }
    }
    for (i, m) in pool.models.iter().enumerate() {
        if m.is_empty() {
            return Err(field(
                format!("models[{i}]"),
                "a model name must not be empty",
            ));
        }
    }
    Ok(PoolSpec {
        name: pool.metadata.name,
        endpoints,
        models: pool.models,
        objectives,
        rewrites: Some(rewrites),
    })
}

fn validate_ports(at: &str, ports: &[PortDoc]) -> Result<(), InvalidPoolFile> {
    use infermesh_raft_store::policy::MAX_TARGET_PORTS;
    if ports.is_empty() || ports.len() > MAX_TARGET_PORTS {
        return Err(field(
            at,
            format!(
                "must list 1 to {MAX_TARGET_PORTS} ports, found {}",
                ports.len()
            ),
        ));
    }
    let mut seen = BTreeSet::new();
    for (i, p) in ports.iter().enumerate() {
        if p.number == 0 {
            return Err(field(
                format!("{at}[{i}].number"),
                "port 0 is not a valid target port",
            ));
        }
        if !seen.insert(p.number) {
            return Err(field(
                format!("{at}[{i}].number"),
                format!("port {} is listed twice", p.number),
            ));
        }
    }
    Ok(())
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
    mut last: PoolSpec,
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
            match load_pool_file(&path) {
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
        assert!(e.starts_with("document 3:"), "{e}");
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
        assert!(matches!(
            parse_pool("kind: InferenceObjective\nmetadata: {name: x}\nspec: {}\n").unwrap_err(),
            InvalidPoolFile::PoolCount(0)
        ));
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
            .map(|p| format!("- {{address: 127.0.0.1, targetPorts: [{{number: {p}}}]}}"))
            .collect();
        format!(
            "kind: InferencePool\nmetadata: {{name: t}}\nspec: {{targetPorts: [{{number: 1}}]}}\npods:\n{}\n",
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
        std::fs::write(&path, "kind: InferencePool\nspec: {targetPorts: []}\n").unwrap();
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
