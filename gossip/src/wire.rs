//! Mesh RPC wire types (postcard over QUIC streams), each frame stamped with a protocol version.
//!
//! A request/response pair travels on one bidirectional stream; one-way messages (load
//! deltas, prefix records, handoff, service casts) on one unidirectional stream each. A frame
//! of another protocol version is refused with [`RemoteError::VersionMismatch`] (requests) or
//! dropped and counted (one-way).

use serde::{Deserialize, Serialize};

use crate::pod::PodId;
use crate::ring::NodeId;

/// Version of the mesh RPC protocol this build speaks (2: a load batch's scrape entry
/// carries [`PodState`], so an owner can announce a pod that stopped answering; 3:
/// [`OneWay::PrefixOps`], removals and endpoint clears from KV events — a v2 node would
/// drop them as malformed and keep blocks the pods no longer hold, so v2 is refused by
/// version instead; 4: [`PodInFlight::prefilling`], which a v3 node would misread as the
/// next entry's bytes).
pub const PROTOCOL_VERSION: u16 = 4;

/// Largest frame a peer accepts (handoff batches are chunked well below this).
pub const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;

/// A versioned frame as written to a stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Frame<T> {
    /// Protocol version of the sender ([`PROTOCOL_VERSION`]).
    pub version: u16,
    /// Sending node.
    pub from: NodeId,
    /// The message.
    pub body: T,
}

/// A request that expects one [`Response`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Match a block-hash chain against the owner's prefix index.
    PrefixLookup {
        /// First block hash of the chain (the ownership key).
        anchor: u64,
        /// The whole chain, anchor first.
        hashes: Vec<u64>,
    },
    /// Opaque request for a registered service channel (e.g. Raft RPCs).
    Service {
        /// Service channel id.
        channel: u16,
        /// Opaque bytes the service decodes itself.
        payload: Vec<u8>,
    },
}

/// The answer to a [`Request`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// Result of [`Request::PrefixLookup`].
    PrefixMatch(PrefixMatch),
    /// Result of [`Request::Service`].
    Service {
        /// Opaque bytes from the service.
        payload: Vec<u8>,
    },
    /// The request could not be served.
    Error(RemoteError),
}

/// Why a peer refused a request (no state changed on the peer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum RemoteError {
    /// The peer speaks another protocol version.
    #[error("peer speaks mesh protocol v{theirs}, we sent v{ours}")]
    VersionMismatch {
        /// Version the peer speaks.
        theirs: u16,
        /// Version we sent.
        ours: u16,
    },
    /// No service is registered on that channel at the peer.
    #[error("no service registered on channel {0}")]
    UnknownChannel(u16),
    /// The service exists but dropped the request (shutting down or overloaded).
    #[error("service on channel {0} did not answer")]
    ServiceUnavailable(u16),
    /// The peer could not decode our frame.
    #[error("peer could not decode the request")]
    Malformed,
}

/// A one-way message; no answer is sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum OneWay {
    /// Load board deltas from the sender.
    Load(LoadBatch),
    /// Prefix picks to record at an anchor owner.
    PrefixRecords(Vec<PrefixRecord>),
    /// Index entries handed to a new owner after a membership change.
    PrefixHandoff(Vec<HandoffEntry>),
    /// Opaque cast for a registered service channel.
    Service {
        /// Service channel id.
        channel: u16,
        /// Opaque bytes.
        payload: Vec<u8>,
    },
    /// Index changes from KV events, applied in this order (a record and the removal of
    /// the same block must not swap, so they travel in one ordered list).
    PrefixOps(Vec<PrefixOp>),
}

/// One change to an owner's prefix index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PrefixOp {
    /// `endpoint` holds these blocks.
    Record(PrefixRecord),
    /// `endpoint` no longer holds these blocks.
    Remove(PrefixRemoval),
    /// `endpoint` holds nothing under any anchor (sent to every node).
    ForgetEndpoint(PodId),
}

/// Blocks an endpoint no longer holds, all under one anchor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrefixRemoval {
    /// First block hash of the chain the blocks belong to (selects the owners).
    pub anchor: u64,
    /// The removed block hashes (any position in the chain).
    pub hashes: Vec<u64>,
    /// The endpoint that evicted them.
    pub endpoint: PodId,
}

/// Per-endpoint result of matching a chain: llm-d `PrefixCacheMatchInfo` inputs.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PrefixMatch {
    /// Blocks in the queried chain.
    pub total_blocks: u32,
    /// Endpoints with at least one matched block, and how many.
    pub endpoints: Vec<EndpointMatch>,
}

impl PrefixMatch {
    /// Matched blocks for `endpoint` (0 when absent).
    pub fn blocks_for(&self, endpoint: &str) -> u32 {
        self.endpoints
            .iter()
            .find(|m| m.endpoint.as_str() == endpoint)
            .map_or(0, |m| m.blocks)
    }
}

/// Matched block count of one endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointMatch {
    /// Endpoint identity (`ip:port`).
    pub endpoint: PodId,
    /// Consecutive matched blocks from the start of the chain.
    pub blocks: u32,
}

/// One pick to record: `endpoint` now holds (optimistically) the blocks of `hashes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrefixRecord {
    /// First block hash.
    pub anchor: u64,
    /// Whole chain, anchor first.
    pub hashes: Vec<u64>,
    /// Endpoint the request went to.
    pub endpoint: PodId,
}

/// Everything an old owner knows under one anchor, as chains per endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoffEntry {
    /// The anchor being handed over.
    pub anchor: u64,
    /// Maximal chains per endpoint; replaying them as records rebuilds the entry.
    pub chains: Vec<HandoffChain>,
}

/// One endpoint's chain under an anchor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoffChain {
    /// Endpoint identity.
    pub endpoint: PodId,
    /// Chain, anchor first.
    pub hashes: Vec<u64>,
}

/// Load facts from one node: scrapes of pods it owns and its own in-flight counts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadBatch {
    /// Sender's batch sequence (starts at its start time in µs, so restarts move forward);
    /// receivers ignore values older than what they already applied.
    pub seq: u64,
    /// When true, `in_flight` is the sender's complete table (absent pods are zero).
    pub full: bool,
    /// Latest scrapes (only pods that changed since the last batch, unless `full`).
    pub scrapes: Vec<PodScrape>,
    /// Absolute in-flight counts (only changed pods, unless `full`).
    pub in_flight: Vec<PodInFlight>,
}

/// One scrape result as shipped between nodes: the owner's latest attempt at the pod.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PodScrape {
    /// Pod identity (`ip:port`).
    pub pod: String,
    /// Milliseconds between the scrape attempt and sending (receivers subtract it from now).
    pub age_ms: u32,
    /// What the attempt found.
    pub state: PodState,
}

/// Outcome of the owner's latest scrape of a pod.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PodState {
    /// The pod answered with these metrics.
    Up(PodMetrics),
    /// The pod did not answer (or answered garbage): not a candidate on any node until a
    /// later successful scrape is published.
    Down,
}

impl PodState {
    /// The metrics, when the pod answered.
    pub fn metrics(&self) -> Option<&PodMetrics> {
        match self {
            PodState::Up(m) => Some(m),
            PodState::Down => None,
        }
    }
}

/// Model-server metrics the scheduler needs, in vLLM terms.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct PodMetrics {
    /// `vllm:num_requests_waiting`
    pub waiting_queue: u32,
    /// `vllm:num_requests_running`
    pub running: u32,
    /// `vllm:kv_cache_usage_perc`, 0.0..=1.0
    pub kv_cache_usage: f32,
    /// `vllm:lora_requests_info`, when reported.
    pub lora: Option<LoraMetrics>,
    /// `vllm:cache_config_info` `block_size`.
    pub cache_block_size: Option<u32>,
    /// `vllm:cache_config_info` `num_gpu_blocks`.
    pub cache_num_blocks: Option<u64>,
}

/// LoRA adapter state from `vllm:lora_requests_info`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LoraMetrics {
    /// `running_lora_adapters`
    pub running: Vec<String>,
    /// `waiting_lora_adapters`
    pub waiting: Vec<String>,
    /// `max_lora`
    pub max_lora: u32,
}

/// A node's own in-flight count for one pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodInFlight {
    /// Pod identity.
    pub pod: String,
    /// Requests dispatched and not completed.
    pub requests: u32,
    /// Estimated prompt tokens of those requests.
    pub tokens: u64,
    /// Those requests whose response has not started (still in queue or prefill).
    pub prefilling: u32,
}

/// Encodes a frame to bytes.
pub fn encode<T: Serialize>(from: &NodeId, body: &T) -> Vec<u8> {
    #[derive(Serialize)]
    struct FrameRef<'a, T> {
        version: u16,
        from: &'a NodeId,
        body: &'a T,
    }
    postcard::to_allocvec(&FrameRef {
        version: PROTOCOL_VERSION,
        from,
        body,
    })
    // Serializing plain data structs to a Vec cannot fail.
    .expect("postcard encoding of mesh frame")
}

/// Why a received frame was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Bytes are not a frame of any version we can read.
    #[error("malformed mesh frame")]
    Malformed,
    /// A frame of another protocol version.
    #[error("mesh protocol v{0} not supported (we speak v{PROTOCOL_VERSION})")]
    Version(u16),
}

/// Decodes a frame, checking the protocol version before the body.
pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<Frame<T>, FrameError> {
    // The version is the first field, so it can be read even when the body is unknown.
    let (version, _) =
        postcard::take_from_bytes::<u16>(bytes).map_err(|_| FrameError::Malformed)?;
    if version != PROTOCOL_VERSION {
        return Err(FrameError::Version(version));
    }
    postcard::from_bytes(bytes).map_err(|_| FrameError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_roundtrip_and_check_version() {
        let me = NodeId::new("n1");
        let req = Request::PrefixLookup {
            anchor: 7,
            hashes: vec![7, 8, 9],
        };
        let bytes = encode(&me, &req);
        let f: Frame<Request> = decode(&bytes).unwrap();
        assert_eq!(f.version, PROTOCOL_VERSION);
        assert_eq!(f.from, me);
        assert_eq!(f.body, req);

        let other = postcard::to_allocvec(&Frame {
            version: 9,
            from: me.clone(),
            body: req,
        })
        .unwrap();
        assert_eq!(decode::<Request>(&other), Err(FrameError::Version(9)));
        assert_eq!(
            decode::<Request>(&[PROTOCOL_VERSION as u8, 0, 200]),
            Err(FrameError::Malformed)
        );
        assert_eq!(decode::<Request>(&[]), Err(FrameError::Malformed));
    }

    #[test]
    fn prefix_ops_roundtrip_in_order_and_v2_frames_are_refused() {
        let me = NodeId::new("n1");
        let ops = OneWay::PrefixOps(vec![
            PrefixOp::Record(PrefixRecord {
                anchor: 1,
                hashes: vec![1, 2],
                endpoint: PodId::new("10.0.0.1:8000"),
            }),
            PrefixOp::Remove(PrefixRemoval {
                anchor: 1,
                hashes: vec![2],
                endpoint: PodId::new("10.0.0.1:8000"),
            }),
            PrefixOp::ForgetEndpoint(PodId::new("10.0.0.2:8000")),
        ]);
        let f: Frame<OneWay> = decode(&encode(&me, &ops)).unwrap();
        assert_eq!(f.body, ops);
        // A v2 peer's records (same body layout) are refused by version.
        let v2 = postcard::to_allocvec(&Frame {
            version: 2u16,
            from: me,
            body: OneWay::PrefixRecords(vec![]),
        })
        .unwrap();
        assert_eq!(decode::<OneWay>(&v2), Err(FrameError::Version(2)));
    }

    #[test]
    fn load_batches_carry_down_markers_and_v1_frames_are_refused() {
        let me = NodeId::new("n1");
        let batch = OneWay::Load(LoadBatch {
            seq: 42,
            full: false,
            scrapes: vec![
                PodScrape {
                    pod: "10.0.0.1:8000".into(),
                    age_ms: 3,
                    state: PodState::Up(PodMetrics {
                        waiting_queue: 2,
                        ..PodMetrics::default()
                    }),
                },
                PodScrape {
                    pod: "10.0.0.2:8000".into(),
                    age_ms: 9,
                    state: PodState::Down,
                },
            ],
            in_flight: vec![],
        });
        let f: Frame<OneWay> = decode(&encode(&me, &batch)).unwrap();
        assert_eq!(f.body, batch);

        // A v1 peer's load batch (scrape entries without a state) is refused by version,
        // before its body is read.
        #[derive(Serialize)]
        struct V1Scrape {
            pod: String,
            age_ms: u32,
            metrics: PodMetrics,
        }
        #[derive(Serialize)]
        struct V1Batch {
            seq: u64,
            full: bool,
            scrapes: Vec<V1Scrape>,
            in_flight: Vec<PodInFlight>,
        }
        #[derive(Serialize)]
        enum V1OneWay {
            Load(V1Batch),
        }
        let v1 = postcard::to_allocvec(&Frame {
            version: 1u16,
            from: me,
            body: V1OneWay::Load(V1Batch {
                seq: 1,
                full: true,
                scrapes: vec![V1Scrape {
                    pod: "10.0.0.1:8000".into(),
                    age_ms: 0,
                    metrics: PodMetrics::default(),
                }],
                in_flight: vec![],
            }),
        })
        .unwrap();
        assert_eq!(decode::<OneWay>(&v1), Err(FrameError::Version(1)));

        // An unknown state tag in a frame claiming our version is malformed, not a panic.
        let mut bad = encode(&NodeId::new("n1"), &batch);
        let down_tag = bad.len() - 2; // ..., PodState::Down tag, empty in_flight
        assert_eq!(bad[down_tag], 1);
        bad[down_tag] = 7;
        assert_eq!(decode::<OneWay>(&bad), Err(FrameError::Malformed));
    }
}
