//! What goes into an engine (requests) and what comes out (tokens, completions, refusals).

use std::time::Duration;

use super::hash::block_hashes;
use super::kv::BlockId;
use crate::profile::EngineProfile;

/// Identifier of a request inside one engine (unique per pod).
pub type RequestId = u64;

/// What a request asks of KV transfer (vLLM `kv_transfer_params`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvTransfer {
    /// An ordinary request.
    #[default]
    None,
    /// `do_remote_decode`: this pod prefills; the response carries the KV block ids.
    RemoteDecode,
    /// `do_remote_prefill`: the prompt's KV is pulled from a prefill pod instead of computed.
    RemotePrefill,
}

/// Why a request ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// It reached the requested `max_tokens`.
    Length,
    /// It reached its natural end (stands in for EOS when no `max_tokens` was given).
    Stop,
}

impl FinishReason {
    /// The OpenAI `finish_reason` string.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::Stop => "stop",
        }
    }
}

/// One multimodal item (an image) of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmItem {
    /// Hash of the item's content (vLLM's `mm_hash`): equal images share it.
    pub hash: u64,
    /// Its encoder output was computed by an encode pod and arrives with the request
    /// (`ec_transfer_params`), so this pod does not run its vision encoder on it.
    pub remote: bool,
}

/// A tokenized request ready for an engine.
#[derive(Debug, Clone)]
pub struct EngineRequest {
    /// Unique id within the engine.
    pub id: RequestId,
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Tokens to generate.
    pub max_tokens: usize,
    /// How the request ends once `max_tokens` tokens are out.
    pub finish: FinishReason,
    /// Index of the LoRA adapter (into the engine's adapter list), if any.
    pub lora: Option<u32>,
    /// P/D behaviour.
    pub kv_transfer: KvTransfer,
    /// Chained hashes of the prompt's full blocks (see [`block_hashes`]).
    pub block_hashes: Vec<u64>,
    /// Images in the prompt, in order; each must be encoded before the prompt is computed.
    pub mm: Vec<MmItem>,
}

impl EngineRequest {
    /// Builds a request and hashes its prompt blocks (done off the engine task, by the caller).
    pub fn new(
        id: RequestId,
        prompt: Vec<u32>,
        max_tokens: usize,
        finish: FinishReason,
        lora: Option<u32>,
        kv_transfer: KvTransfer,
        block_size: usize,
    ) -> Self {
        let block_hashes = block_hashes(&prompt, lora, block_size);
        Self {
            id,
            prompt,
            max_tokens,
            finish,
            lora,
            kv_transfer,
            block_hashes,
            mm: Vec::new(),
        }
    }

    /// The same request with images `mm` in its prompt.
    pub fn with_mm(mut self, mm: Vec<MmItem>) -> Self {
        self.mm = mm;
        self
    }
}

/// Why [`Engine::submit`] refused a request (the engine state is unchanged).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// The prompt has no tokens.
    #[error("The prompt cannot be empty.")]
    EmptyPrompt,
    /// Prompt plus completion exceed the model's context.
    #[error(
        "This model's maximum context length is {max_model_len} tokens. However, you requested {total} tokens ({prompt} in the messages, {completion} in the completion). Please reduce the length of the messages or completion."
    )]
    TooLong {
        /// `max_model_len`.
        max_model_len: usize,
        /// prompt + completion.
        total: usize,
        /// Prompt tokens.
        prompt: usize,
        /// Requested completion tokens.
        completion: usize,
    },
    /// The sequence could never fit in this pod's KV cache.
    #[error(
        "The request needs {needed} KV blocks but the cache holds {capacity} ({prompt} prompt + {completion} completion tokens)."
    )]
    ExceedsKvCapacity {
        /// Blocks needed.
        needed: usize,
        /// Blocks in the pod.
        capacity: usize,
        /// Prompt tokens.
        prompt: usize,
        /// Requested completion tokens.
        completion: usize,
    },
    /// An encode request without any image.
    #[error("the request has no multimodal items to encode")]
    NothingToEncode,
    /// The id is already in use.
    #[error("duplicate request id {0}")]
    DuplicateId(RequestId),
}

/// The end of a request, with its usage.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// Prompt tokens whose KV was not computed here (local prefix hits + remote prefill).
    pub cached_tokens: usize,
    /// Why it ended.
    pub finish: FinishReason,
    /// KV blocks that held the prompt (reported to a decode pod as `remote_block_ids`).
    pub prompt_block_ids: Vec<BlockId>,
    /// Simulated time of the finish.
    pub at: Duration,
}

/// Something the engine produced for a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// The `index`-th (0-based) generated token is out.
    Token {
        /// The request.
        id: RequestId,
        /// 0-based position in the completion.
        index: usize,
        /// Simulated time it was produced.
        at: Duration,
    },
    /// An encode-only request is done: its images' encoder outputs exist.
    Encoded {
        /// The request.
        id: RequestId,
        /// Images in the request.
        images: usize,
        /// Of those, images found in the encoder cache (not encoded again).
        hits: usize,
        /// Simulated time it was done.
        at: Duration,
    },
    /// The request finished (always after its last `Token`).
    Finished {
        /// The request.
        id: RequestId,
        /// Usage and reason.
        completion: Completion,
    },
}

/// Refuses requests no pod with this profile could ever serve (empty, too long, bigger
/// than the KV cache); used by HTTP handlers before submitting.
pub fn check_limits(
    p: &EngineProfile,
    prompt: usize,
    completion: usize,
) -> Result<(), SubmitError> {
    if prompt == 0 {
        return Err(SubmitError::EmptyPrompt);
    }
    if prompt + completion > p.max_model_len {
        return Err(SubmitError::TooLong {
            max_model_len: p.max_model_len,
            total: prompt + completion,
            prompt,
            completion,
        });
    }
    let needed = (prompt + completion).div_ceil(p.block_size);
    if needed > p.num_gpu_blocks {
        return Err(SubmitError::ExceedsKvCapacity {
            needed,
            capacity: p.num_gpu_blocks,
            prompt,
            completion,
        });
    }
    Ok(())
}
