//! OpenAI request bodies (as vLLM accepts them) and the response/chunk bodies it writes.
//!
//! Unknown request fields are accepted and ignored, as vLLM does; fields the simulator
//! cannot honour (`n > 1`, several prompts in one request) are refused with a 400.

use serde::{Deserialize, Serialize};

use super::error::ApiError;
use crate::engine::{FinishReason, KvTransfer};
use crate::tokenizer::{self, Tokenizer};

/// A text or token-id prompt (`prompt` of /v1/completions).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptInput {
    /// One text prompt.
    Text(String),
    /// Token ids.
    Tokens(Vec<u32>),
    /// A list of text prompts (only one is supported).
    Texts(Vec<String>),
    /// A list of token-id prompts (only one is supported).
    TokenLists(Vec<Vec<u32>>),
}

/// `stream_options`.
#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a final chunk with `usage`.
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// Body of POST /v1/completions (and /v1/completions/render, /tokenize).
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    /// Model or LoRA adapter name; the served model when absent.
    #[serde(default)]
    pub model: Option<String>,
    /// The prompt.
    #[serde(default)]
    pub prompt: Option<PromptInput>,
    /// Completion length.
    #[serde(default)]
    pub max_tokens: Option<i64>,
    /// SSE streaming.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Streaming options.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Number of choices (only 1 is supported).
    #[serde(default)]
    pub n: Option<i64>,
    /// P/D parameters.
    #[serde(default)]
    pub kv_transfer_params: Option<serde_json::Value>,
}

/// One part of a multi-part message content.
#[derive(Debug, Deserialize)]
pub struct ContentPart {
    /// `text`, `image_url`, …
    #[serde(rename = "type")]
    pub kind: String,
    /// Text of a `text` part.
    #[serde(default)]
    pub text: Option<String>,
    /// The image of an `image_url` part.
    #[serde(default)]
    pub image_url: Option<ImageUrl>,
}

/// `image_url` of a content part: a URL or a `data:` URL holding the image.
#[derive(Debug, Deserialize)]
pub struct ImageUrl {
    /// The URL.
    pub url: String,
}

/// A chat conversation rendered for the engine.
#[derive(Debug, Clone, PartialEq)]
pub struct RenderedChat {
    /// The prompt text, each image standing as `image_tokens` tokens derived from it.
    pub text: String,
    /// Content hashes of the images, in prompt order (vLLM's `mm_hash`).
    pub images: Vec<u64>,
}

/// The content hash of an image (its URL stands for its bytes: the sim fetches nothing).
pub fn image_hash(url: &str) -> u64 {
    xxhash_rust::xxh64::xxh64(url.as_bytes(), 0x1a6e)
}

/// Text that tokenizes to about `tokens` tokens with the built-in tokenizer (a
/// `tokenizer.json` may cut it into more or fewer), the same for the same image, so prefix
/// caching tells images apart and an image costs prompt positions as in a VLM.
fn image_placeholder(hash: u64, tokens: usize) -> String {
    let hex = format!("{hash:016x}");
    hex.chars()
        .cycle()
        .take(tokens * tokenizer::BYTES_PER_TOKEN)
        .collect()
}

/// Message content: a string or a list of parts.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    /// Plain text.
    Text(String),
    /// Typed parts.
    Parts(Vec<ContentPart>),
}

/// One chat message.
#[derive(Debug, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, `tool`.
    pub role: String,
    /// The content (may be null for assistant tool calls).
    #[serde(default)]
    pub content: Option<MessageContent>,
}

/// Body of POST /v1/chat/completions.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    /// Model or LoRA adapter name.
    #[serde(default)]
    pub model: Option<String>,
    /// The conversation.
    #[serde(default)]
    pub messages: Option<Vec<ChatMessage>>,
    /// Completion length (legacy name).
    #[serde(default)]
    pub max_tokens: Option<i64>,
    /// Completion length.
    #[serde(default)]
    pub max_completion_tokens: Option<i64>,
    /// SSE streaming.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Streaming options.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Number of choices (only 1 is supported).
    #[serde(default)]
    pub n: Option<i64>,
    /// P/D parameters.
    #[serde(default)]
    pub kv_transfer_params: Option<serde_json::Value>,
    /// E/P/D: encoder outputs an encode pod produced for this request's images.
    #[serde(default)]
    pub ec_transfer_params: Option<serde_json::Value>,
}

/// Parses a JSON body, naming the field at fault on error.
pub fn parse_json<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        // Untagged enums fail with a generic message; say what the field accepts instead.
        if inner.to_string().contains("did not match any variant") {
            let expected = if path == "prompt" {
                "a string, a list of token ids, or a one-element list of either"
            } else if path.ends_with(".content") {
                "a string or a list of content parts"
            } else {
                "a value of another shape"
            };
            return ApiError::bad_request(format!(
                "invalid request body: `{path}` must be {expected}"
            ));
        }
        if path == "." || path.is_empty() {
            ApiError::bad_request(format!("invalid request body: {inner}"))
        } else {
            ApiError::bad_request(format!("invalid request body at `{path}`: {inner}"))
        }
    })
}

impl CompletionRequest {
    /// The prompt as token ids of the built-in tokenizer.
    pub fn prompt_tokens(&self) -> Result<Vec<u32>, ApiError> {
        self.prompt_tokens_with(&Tokenizer::Builtin)
    }

    /// The prompt as token ids; text is encoded with `tok`, token ids are taken as given.
    pub fn prompt_tokens_with(&self, tok: &Tokenizer) -> Result<Vec<u32>, ApiError> {
        match &self.prompt {
            None => Err(ApiError::bad_request(
                "`prompt` is required (a string, a list of token ids, or a one-element list of either)",
            )),
            Some(PromptInput::Text(s)) => Ok(tok.tokenize(s)?),
            Some(PromptInput::Tokens(t)) => Ok(t.clone()),
            Some(PromptInput::Texts(v)) if v.len() == 1 => Ok(tok.tokenize(&v[0])?),
            Some(PromptInput::TokenLists(v)) if v.len() == 1 => Ok(v[0].clone()),
            Some(PromptInput::Texts(v)) => Err(several_prompts(v.len())),
            Some(PromptInput::TokenLists(v)) => Err(several_prompts(v.len())),
        }
    }
}

fn several_prompts(n: usize) -> ApiError {
    ApiError::bad_request(format!(
        "`prompt` holds {n} prompts; infermesh-sim serves one prompt per request"
    ))
}

impl ChatRequest {
    /// The conversation rendered with the chat template; each image takes `image_tokens`.
    pub fn render(&self, image_tokens: usize) -> Result<RenderedChat, ApiError> {
        let Some(messages) = &self.messages else {
            return Err(ApiError::bad_request("`messages` is required"));
        };
        if messages.is_empty() {
            return Err(ApiError::bad_request("`messages` must not be empty"));
        }
        let mut rendered: Vec<(&str, String)> = Vec::with_capacity(messages.len());
        let mut images = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if !matches!(
                m.role.as_str(),
                "system" | "user" | "assistant" | "tool" | "developer"
            ) {
                return Err(ApiError::bad_request(format!(
                    "`messages[{i}].role` is `{}`; expected system, user, assistant, tool or developer",
                    m.role
                )));
            }
            let content = match &m.content {
                None => String::new(),
                Some(MessageContent::Text(s)) => s.clone(),
                Some(MessageContent::Parts(parts)) => {
                    let mut s = String::new();
                    for p in parts {
                        match (p.kind.as_str(), &p.text) {
                            ("text", Some(t)) => s.push_str(t),
                            ("text", None) => {
                                return Err(ApiError::bad_request(format!(
                                    "`messages[{i}].content` has a text part without `text`"
                                )));
                            }
                            ("image_url", _) => {
                                let Some(img) = &p.image_url else {
                                    return Err(ApiError::bad_request(format!(
                                        "`messages[{i}].content` has an image_url part without `image_url.url`"
                                    )));
                                };
                                let h = image_hash(&img.url);
                                images.push(h);
                                s.push_str("<|image|>");
                                s.push_str(&image_placeholder(h, image_tokens));
                            }
                            // Other media (audio, video) is a fixed placeholder, not encoded.
                            (_, _) => s.push_str("<|media|>"),
                        }
                    }
                    s
                }
            };
            rendered.push((m.role.as_str(), content));
        }
        Ok(RenderedChat {
            text: tokenizer::chat_prompt(rendered.iter().map(|(r, c)| (*r, c.as_str()))),
            images,
        })
    }
}

/// Checks `n`.
pub fn check_n(n: Option<i64>) -> Result<(), ApiError> {
    match n {
        None | Some(1) => Ok(()),
        Some(n) if n < 1 => Err(ApiError::bad_request(format!(
            "n must be at least 1, got {n}."
        ))),
        Some(n) => Err(ApiError::bad_request(format!(
            "n is {n}; infermesh-sim generates one choice per request"
        ))),
    }
}

/// Resolves `max_tokens`: the requested count with `length`, or the profile default with `stop`.
pub fn resolve_max_tokens(
    requested: Option<i64>,
    default: usize,
    room: usize,
) -> Result<(usize, FinishReason), ApiError> {
    match requested {
        Some(n) if n < 1 => Err(ApiError::bad_request(format!(
            "max_tokens must be at least 1, got {n}."
        ))),
        Some(n) => Ok((
            usize::try_from(n).unwrap_or(usize::MAX),
            FinishReason::Length,
        )),
        None => Ok((default.min(room.max(1)), FinishReason::Stop)),
    }
}

/// Reads `kv_transfer_params` (NIXL connector fields).
pub fn parse_kv_transfer(v: &Option<serde_json::Value>) -> Result<KvTransfer, ApiError> {
    let Some(v) = v else {
        return Ok(KvTransfer::None);
    };
    if v.is_null() {
        return Ok(KvTransfer::None);
    }
    let Some(obj) = v.as_object() else {
        return Err(ApiError::bad_request(
            "`kv_transfer_params` must be an object",
        ));
    };
    let flag = |k: &str| -> Result<bool, ApiError> {
        match obj.get(k) {
            None | Some(serde_json::Value::Null) => Ok(false),
            Some(serde_json::Value::Bool(b)) => Ok(*b),
            Some(_) => Err(ApiError::bad_request(format!(
                "`kv_transfer_params.{k}` must be a boolean"
            ))),
        }
    };
    match (flag("do_remote_decode")?, flag("do_remote_prefill")?) {
        (true, true) => Err(ApiError::bad_request(
            "`kv_transfer_params` cannot set both do_remote_decode and do_remote_prefill",
        )),
        (true, false) => Ok(KvTransfer::RemoteDecode),
        (false, true) => Ok(KvTransfer::RemotePrefill),
        (false, false) => Ok(KvTransfer::None),
    }
}

/// Reads the image hashes an encode pod's output covers from `ec_transfer_params`
/// (`{"mm_hashes": ["<16 hex digits>", ...], ...}`, as the sidecar forwards it).
pub fn parse_ec_transfer(v: &Option<serde_json::Value>) -> Result<Vec<u64>, ApiError> {
    let Some(v) = v.as_ref().filter(|v| !v.is_null()) else {
        return Ok(Vec::new());
    };
    let bad = || {
        ApiError::bad_request(
            "`ec_transfer_params.mm_hashes` must be a list of 16-hex-digit image hashes",
        )
    };
    let Some(list) = v.get("mm_hashes") else {
        return Ok(Vec::new());
    };
    let list = list.as_array().ok_or_else(bad)?;
    list.iter()
        .map(|h| {
            h.as_str()
                .and_then(|h| u64::from_str_radix(h, 16).ok())
                .ok_or_else(bad)
        })
        .collect()
}

/// An image hash as it travels in `ec_transfer_params`.
pub fn mm_hash_hex(h: u64) -> String {
    format!("{h:016x}")
}

/// `usage.prompt_tokens_details`.
#[derive(Debug, Serialize)]
pub struct PromptTokensDetails {
    /// Prompt tokens served from cache.
    pub cached_tokens: usize,
}

/// `usage`.
#[derive(Debug, Serialize)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// prompt + completion.
    pub total_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// Cache details.
    pub prompt_tokens_details: PromptTokensDetails,
}

impl Usage {
    /// Usage from the engine's counts.
    pub fn new(prompt: usize, completion: usize, cached: usize) -> Self {
        Self {
            prompt_tokens: prompt,
            total_tokens: prompt + completion,
            completion_tokens: completion,
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens: cached,
            },
        }
    }
}

/// A /v1/completions choice (also the streaming chunk choice).
#[derive(Debug, Serialize)]
pub struct CompletionChoice<'a> {
    /// Always 0.
    pub index: u32,
    /// Generated text (this chunk's, when streaming).
    pub text: &'a str,
    /// Not produced.
    pub logprobs: Option<()>,
    /// `length`/`stop` on the last chunk.
    pub finish_reason: Option<&'static str>,
    /// Not produced.
    pub stop_reason: Option<()>,
}

/// A /v1/completions response or streaming chunk.
#[derive(Debug, Serialize)]
pub struct CompletionBody<'a> {
    /// `cmpl-…`.
    pub id: &'a str,
    /// `text_completion`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// Model name as requested.
    pub model: &'a str,
    /// One choice, or none in the usage chunk.
    pub choices: Vec<CompletionChoice<'a>>,
    /// Usage (final body / usage chunk).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// P/D parameters for the decode pod (non-streaming responses).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kv_transfer_params: Option<&'a serde_json::Value>,
}

/// A chat message or delta.
#[derive(Debug, Serialize)]
pub struct ChatMessageOut<'a> {
    /// `assistant` (first delta and full message only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    /// Content.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<&'a str>,
}

/// A chat choice (`message`) or chunk choice (`delta`).
#[derive(Debug, Serialize)]
pub struct ChatChoice<'a> {
    /// Always 0.
    pub index: u32,
    /// Full message (non-streaming).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<ChatMessageOut<'a>>,
    /// Delta (streaming).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delta: Option<ChatMessageOut<'a>>,
    /// Not produced.
    pub logprobs: Option<()>,
    /// `length`/`stop` on the last chunk.
    pub finish_reason: Option<&'static str>,
}

/// A /v1/chat/completions response or chunk.
#[derive(Debug, Serialize)]
pub struct ChatBody<'a> {
    /// `chatcmpl-…`.
    pub id: &'a str,
    /// `chat.completion` or `chat.completion.chunk`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// Model name as requested.
    pub model: &'a str,
    /// One choice, or none in the usage chunk.
    pub choices: Vec<ChatChoice<'a>>,
    /// Usage (final body / usage chunk).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// P/D parameters for the decode pod (non-streaming responses).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kv_transfer_params: Option<&'a serde_json::Value>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_tokens_rules_match_vllm() {
        assert_eq!(
            resolve_max_tokens(Some(0), 16, 100).unwrap_err().message,
            "max_tokens must be at least 1, got 0."
        );
        assert_eq!(
            resolve_max_tokens(Some(5), 16, 100).unwrap(),
            (5, FinishReason::Length)
        );
        assert_eq!(
            resolve_max_tokens(None, 16, 10).unwrap(),
            (10, FinishReason::Stop)
        );
    }

    #[test]
    fn bad_bodies_name_the_field() {
        let e =
            parse_json::<CompletionRequest>(br#"{"prompt":"x","max_tokens":"ten"}"#).unwrap_err();
        assert!(e.message.contains("max_tokens"), "{}", e.message);
        let e = parse_json::<CompletionRequest>(br#"{"prompt":5}"#).unwrap_err();
        assert!(
            e.message.contains("`prompt` must be a string"),
            "{}",
            e.message
        );
        let e = parse_json::<ChatRequest>(br#"{"messages":[{"role":"user","content":5}]}"#)
            .unwrap_err();
        assert!(e.message.contains("messages[0].content"), "{}", e.message);
        let e = parse_json::<CompletionRequest>(b"{not json").unwrap_err();
        assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
    }

    #[test]
    fn kv_transfer_params_are_read() {
        let v = Some(serde_json::json!({"do_remote_decode": true}));
        assert_eq!(parse_kv_transfer(&v).unwrap(), KvTransfer::RemoteDecode);
        let v = Some(serde_json::json!({"do_remote_prefill": true, "remote_block_ids": [1]}));
        assert_eq!(parse_kv_transfer(&v).unwrap(), KvTransfer::RemotePrefill);
        let v = Some(serde_json::json!({"do_remote_prefill": "yes"}));
        assert!(parse_kv_transfer(&v).is_err());
    }

    #[test]
    fn prompts_of_every_accepted_shape() {
        let r: CompletionRequest = parse_json(br#"{"prompt":[[1,2,3]]}"#).unwrap();
        assert_eq!(r.prompt_tokens().unwrap(), vec![1, 2, 3]);
        let r: CompletionRequest = parse_json(br#"{"prompt":["abcdefgh"]}"#).unwrap();
        assert_eq!(r.prompt_tokens().unwrap().len(), 2);
        let r: CompletionRequest = parse_json(br#"{"prompt":["a","b"]}"#).unwrap();
        assert!(r.prompt_tokens().is_err());
        let r: CompletionRequest = parse_json(br#"{"model":"m"}"#).unwrap();
        assert!(r.prompt_tokens().unwrap_err().message.contains("prompt"));
    }
}
