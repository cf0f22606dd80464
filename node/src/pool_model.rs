//! The pool model: which endpoints a pool has (as discovery, the policy store or a test
//! describes them), which engine each runs, and the inputs that drive the pool task. A
//! leaf: everything that builds or consumes a pool depends on it, it depends on nothing
//! in the crate.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

/// The pod label that names the engine (llm-d `engineLabelKey`).
pub const ENGINE_LABEL: &str = "llm-d.ai/engine-type";
/// The legacy GIE spelling of the same label.
pub const LEGACY_ENGINE_LABEL: &str = "inference.networking.k8s.io/engine-type";

/// A model-server engine whose metric names the fetcher knows (llm-d's built-in
/// `engineConfigs`; their names can be overridden in `core-metrics-extractor`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// vLLM (the default, as in llm-d).
    Vllm,
    /// SGLang.
    Sglang,
    /// TensorRT-LLM's `trtllm-serve`.
    TrtllmServe,
    /// Triton with the TensorRT-LLM backend.
    TritonTensorrtLlm,
}

/// A pod's engine label names an engine the fetcher does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown engine type {0:?} in label {ENGINE_LABEL} (known: vllm, sglang, trtllm-serve, triton-tensorrt-llm)"
)]
pub struct UnknownEngine(pub String);

impl Engine {
    /// The engine a pod's labels name; vLLM when unlabelled.
    pub fn from_labels(labels: &BTreeMap<String, String>) -> Result<Engine, UnknownEngine> {
        match labels
            .get(ENGINE_LABEL)
            .or_else(|| labels.get(LEGACY_ENGINE_LABEL))
            .map(String::as_str)
        {
            None => Ok(Engine::Vllm),
            Some(name) => Engine::named(name).ok_or_else(|| UnknownEngine(name.to_owned())),
        }
    }

    /// The engine llm-d calls `name`.
    pub fn named(name: &str) -> Option<Engine> {
        [
            Engine::Vllm,
            Engine::Sglang,
            Engine::TrtllmServe,
            Engine::TritonTensorrtLlm,
        ]
        .into_iter()
        .find(|e| e.name() == name)
    }

    /// llm-d's name of the engine (its `engineConfigs[].name` and label value).
    pub fn name(self) -> &'static str {
        match self {
            Engine::Vllm => "vllm",
            Engine::Sglang => "sglang",
            Engine::TrtllmServe => "trtllm-serve",
            Engine::TritonTensorrtLlm => "triton-tensorrt-llm",
        }
    }
}

/// One endpoint (pod ip:port) of the pool, as discovery found it.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointSpec {
    /// `ip:port`: the endpoint's identity.
    pub address: SocketAddr,
    /// The pod's name (for logs and metrics).
    pub pod: String,
    /// Pod labels.
    pub labels: BTreeMap<String, String>,
    /// Metric names to scrape, from `llm-d.ai/engine-type`.
    pub engine: Engine,
}

/// The pool as a discovery file describes it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PoolSpec {
    /// Pool name (`metadata.name`).
    pub name: String,
    /// Every endpoint, in file order.
    pub endpoints: Vec<EndpointSpec>,
    /// Served model names declared in the file (empty = ask the pods).
    pub models: Vec<String>,
    /// InferenceObjective name → priority.
    pub objectives: HashMap<String, i32>,
    /// InferenceModelRewrites this source defines: `Some` (possibly empty) when the source
    /// owns the node's rewrites (an endpoints file), `None` when another source does (Raft).
    pub rewrites: Option<Vec<RewriteDoc>>,
}

/// An InferenceModelRewrite document, validated as the policy store validates it.
pub type RewriteDoc =
    infermesh_raft_store::policy::Document<infermesh_raft_store::policy::InferenceModelRewriteSpec>;

/// The pool of a simulated fleet (`infermesh-sim`), as the demo, the benchmarks and the
/// tests build it: pool `demo` serving `model`, vLLM endpoints at `addrs`, pods named
/// `sim-0`, `sim-1`, … in order, no labels.
pub fn fleet_pool(addrs: &[SocketAddr], model: &str) -> PoolSpec {
    PoolSpec {
        name: "demo".into(),
        endpoints: addrs
            .iter()
            .enumerate()
            .map(|(i, a)| EndpointSpec {
                address: *a,
                pod: format!("sim-{i}"),
                labels: Default::default(),
                engine: Engine::Vllm,
            })
            .collect(),
        models: vec![model.to_owned()],
        objectives: Default::default(),
        rewrites: None,
    }
}

/// What the pool task reacts to.
#[derive(Debug)]
pub enum PoolInput {
    /// Discovery produced a (validated) pool description.
    Spec(PoolSpec),
    /// A pod's `/v1/models` answer.
    Models {
        /// The endpoint that answered.
        addr: SocketAddr,
        /// Model ids it serves.
        models: Vec<String>,
    },
    /// The mesh reassigned which pods this node scrapes (`ip:port` each).
    Owned(Arc<Vec<infermesh_gossip::PodId>>),
}
