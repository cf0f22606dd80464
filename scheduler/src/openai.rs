//! OpenAI request parsing (llm-d's `openai-parser`), shared by the ext_proc path and the proxy.
//!
//! The prompt bytes are what llm-d's approximate prefix producer hashes: the completions
//! prompt as plain text (string arrays joined with a space), or the chat `messages`
//! re-marshalled the way Go's `encoding/json` marshals llm-d's `[]Message` type
//! (`{"role":…,"content":…}` with Go's HTML-safe string escaping). Known difference: Go
//! matches JSON field names case-insensitively and takes the last duplicate key; this parser
//! is case-sensitive and rejects duplicate keys.

use std::cell::Cell;
use std::ops::Range;

use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;

/// How a request body is read, as decided by the parser its path resolves to
/// ([`crate::parsers::RequestParsers::resolve`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiKind {
    /// openai parser: `/v1/completions`
    Completions,
    /// openai parser: `/v1/chat/completions`
    ChatCompletions,
    /// openai parser: `/v1/embeddings`
    Embeddings,
    /// openai parser: `/v1/responses`
    Responses,
    /// anthropic parser: `/v1/messages`
    AnthropicMessages,
    /// vllmhttp parser: `/inference/v1/generate`, vLLM's token-in API (`token_ids`,
    /// `sampling_params`; `model` optional).
    VllmGenerate,
    /// passthrough: a path only `passthrough-parser` takes, or a claimed path whose body
    /// infermesh does not read; the body is forwarded unread and the request is routed by
    /// load alone (no model check, no prefix data).
    Passthrough,
}

impl ApiKind {
    /// Whether the body is parsed (everything but passthrough).
    pub fn parses_body(self) -> bool {
        self != ApiKind::Passthrough
    }

    /// Whether the body must name a `model` (vLLM's generate API may leave it out: the
    /// request is then routed without a model check, as a vLLM pod serves one model).
    pub fn requires_model(self) -> bool {
        self.parses_body() && self != ApiKind::VllmGenerate
    }
}

/// The fields of a request body the scheduler needs.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ParsedBody {
    /// `model`
    pub model: String,
    /// Byte range of the `model` value (the JSON string, quotes included) in the body, so
    /// a model rewrite can splice the target in without parsing the body again.
    pub model_span: Range<usize>,
    /// The bytes llm-d hashes for prefix matching (see the module docs).
    pub prompt_bytes: Vec<u8>,
    /// `stream: true`
    pub stream: bool,
    /// `max_tokens`, else `max_completion_tokens` (`max_output_tokens` for responses).
    pub max_tokens: Option<u32>,
    /// `cache_salt`, when present and non-empty.
    pub cache_salt: Option<String>,
    /// Number of prompt token ids when the completions prompt is a token array.
    pub prompt_token_ids: Option<usize>,
    /// The prompt carries multimodal items (chat `image_url`, `video_url`, `input_audio`
    /// or `audio_url` parts; Anthropic `image` blocks), read during the one parse.
    pub multimodal: bool,
}

impl ParsedBody {
    /// `body` (the one this was parsed from) with its `model` value replaced by `target`.
    pub fn with_model(&self, body: &[u8], target: &str) -> Vec<u8> {
        replace_model(body, self.model_span.clone(), target)
    }
}

/// `body` with the JSON value at `span` (a [`ParsedBody::model_span`]) replaced by the
/// string `target`; every other byte is kept.
pub fn replace_model(body: &[u8], span: Range<usize>, target: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + target.len());
    out.extend_from_slice(&body[..span.start]);
    out.extend_from_slice(
        serde_json::to_string(target)
            .expect("a string always serializes")
            .as_bytes(),
    );
    out.extend_from_slice(&body[span.end..]);
    out
}

/// Why a request body was rejected (maps to HTTP 400); nothing was scheduled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidRequest {
    /// The body is not valid JSON.
    #[error("request body is not valid JSON: {0}")]
    BadJson(String),
    /// The body is JSON but not an object.
    #[error("request body must be a JSON object")]
    NotAnObject,
    /// `model` is missing or empty.
    #[error("request body has no \"model\" field (a non-empty string is required)")]
    MissingModel,
    /// Completions request without a usable `prompt`.
    #[error("invalid completions request: must have prompt field")]
    MissingPrompt,
    /// Chat or messages request without at least one message.
    #[error("invalid chat completions request: must have at least one message in \"messages\"")]
    MissingMessages,
    /// vLLM generate request without token ids.
    #[error("invalid generate request: must have non-empty token_ids field")]
    MissingTokenIds,
    /// Embeddings or responses request without a usable `input`.
    #[error("invalid request: must have a non-empty \"input\" field")]
    MissingInput,
    /// A field has the wrong type or value.
    #[error("invalid field \"{field}\": {reason}")]
    InvalidField {
        /// JSON path of the field, e.g. `messages[2].content`.
        field: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

thread_local! {
    static BODY_PARSES: Cell<u64> = const { Cell::new(0) };
}

/// Whole-body JSON parses [`parse_openai`] has done on the calling thread: lets a test show
/// that a request's body is parsed once however many steps the request path has.
pub fn body_parses_on_this_thread() -> u64 {
    BODY_PARSES.with(Cell::get)
}

/// The top-level fields every parser reads, taken in one pass over the body; other fields
/// are skipped unread.
#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(borrow, default)]
    model: Option<&'a RawValue>,
    #[serde(default)]
    stream: Option<Value>,
    #[serde(default)]
    max_tokens: Option<Value>,
    #[serde(default)]
    max_completion_tokens: Option<Value>,
    #[serde(default)]
    max_output_tokens: Option<Value>,
    #[serde(default)]
    cache_salt: Option<Value>,
    #[serde(default)]
    prompt: Option<Value>,
    #[serde(default)]
    messages: Option<Value>,
    #[serde(default)]
    input: Option<Value>,
    #[serde(default)]
    instructions: Option<Value>,
    #[serde(default)]
    system: Option<Value>,
    #[serde(default)]
    token_ids: Option<Value>,
    #[serde(default)]
    sampling_params: Option<Value>,
    #[serde(default)]
    tools: Option<Value>,
}

/// Parses a request body with the parser of `kind` (one pass over the body).
/// [`ApiKind::Passthrough`] bodies are not parsed: the result only says "no model".
pub fn parse_openai(kind: ApiKind, body: &[u8]) -> Result<ParsedBody, InvalidRequest> {
    if !kind.parses_body() {
        return Ok(ParsedBody::default());
    }
    BODY_PARSES.with(|c| c.set(c.get() + 1));
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return Err(
            match serde_json::from_slice::<serde::de::IgnoredAny>(body) {
                Ok(_) => InvalidRequest::NotAnObject,
                Err(e) => InvalidRequest::BadJson(e.to_string()),
            },
        );
    }
    let f: Fields<'_> =
        serde_json::from_slice(body).map_err(|e| InvalidRequest::BadJson(e.to_string()))?;
    let (model, model_span) = match f.model {
        Some(raw_model) => {
            let model = match serde_json::from_str::<Value>(raw_model.get()) {
                Ok(Value::String(s)) if !s.is_empty() => s,
                Ok(Value::String(_)) | Ok(Value::Null) if kind.requires_model() => {
                    return Err(InvalidRequest::MissingModel);
                }
                Ok(Value::String(_)) | Ok(Value::Null) => String::new(),
                _ => {
                    return Err(InvalidRequest::InvalidField {
                        field: "model".into(),
                        reason: "must be a string",
                    });
                }
            };
            // The raw value borrows from `body`, so its offset there is the span to rewrite.
            let start = raw_model.get().as_ptr() as usize - body.as_ptr() as usize;
            (model, start..start + raw_model.get().len())
        }
        None if kind.requires_model() => return Err(InvalidRequest::MissingModel),
        None => (String::new(), 0..0),
    };
    let stream = matches!(f.stream, Some(Value::Bool(true)));
    let max_tokens = if kind == ApiKind::VllmGenerate {
        let max = f
            .sampling_params
            .as_ref()
            .filter(|v| !v.is_null())
            .map(|v| match v {
                Value::Object(m) => Ok(m.get("max_tokens")),
                _ => Err(InvalidRequest::InvalidField {
                    field: "sampling_params".into(),
                    reason: "must be an object",
                }),
            })
            .transpose()?
            .flatten();
        read_u32(max, "sampling_params.max_tokens")?
    } else {
        match read_u32(f.max_tokens.as_ref(), "max_tokens")? {
            Some(v) => Some(v),
            None => match read_u32(f.max_completion_tokens.as_ref(), "max_completion_tokens")? {
                Some(v) => Some(v),
                None => read_u32(f.max_output_tokens.as_ref(), "max_output_tokens")?,
            },
        }
    };
    let cache_salt = match f.cache_salt {
        Some(Value::String(s)) if !s.is_empty() => Some(s),
        Some(Value::String(_)) | Some(Value::Null) | None => None,
        Some(_) => {
            return Err(InvalidRequest::InvalidField {
                field: "cache_salt".into(),
                reason: "must be a string",
            });
        }
    };
    let mut parsed = ParsedBody {
        model,
        model_span,
        stream,
        max_tokens,
        cache_salt,
        ..ParsedBody::default()
    };
    match kind {
        ApiKind::Completions => completions_prompt(f.prompt, &mut parsed)?,
        ApiKind::ChatCompletions => {
            parsed.prompt_bytes = tools_prefix(f.tools.as_ref());
            let messages = chat_messages_json(f.messages.as_ref(), &mut parsed.multimodal)?;
            parsed.prompt_bytes.extend_from_slice(&messages);
        }
        ApiKind::Embeddings => embeddings_input(f.input, &mut parsed)?,
        ApiKind::Responses => {
            parsed.prompt_bytes =
                responses_prompt(f.instructions.as_ref(), f.tools.as_ref(), f.input.as_ref())?;
        }
        ApiKind::AnthropicMessages => {
            parsed.prompt_bytes = tools_prefix(f.tools.as_ref());
            let prompt = anthropic_prompt(f.system.as_ref(), f.messages.as_ref())?;
            parsed.prompt_bytes.extend_from_slice(&prompt);
            parsed.multimodal = anthropic_has_images(f.messages.as_ref());
        }
        ApiKind::VllmGenerate => generate_tokens(f.token_ids.as_ref(), &mut parsed)?,
        ApiKind::Passthrough => {}
    }
    Ok(parsed)
}

/// vLLM generate: `token_ids` (required, non-empty). The ids are hashed as 4-byte
/// little-endian words, so a prefix block of `blockSizeTokens × 4` bytes is exactly
/// `blockSizeTokens` tokens and equal token prefixes share blocks.
fn generate_tokens(ids: Option<&Value>, out: &mut ParsedBody) -> Result<(), InvalidRequest> {
    let ids = match ids {
        Some(Value::Array(ids)) if !ids.is_empty() => ids,
        Some(Value::Array(_)) | Some(Value::Null) | None => {
            return Err(InvalidRequest::MissingTokenIds);
        }
        Some(_) => {
            return Err(InvalidRequest::InvalidField {
                field: "token_ids".into(),
                reason: "must be an array of token ids",
            });
        }
    };
    let mut bytes = Vec::with_capacity(ids.len() * 4);
    for (i, id) in ids.iter().enumerate() {
        let id = id
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| InvalidRequest::InvalidField {
                field: format!("token_ids[{i}]"),
                reason: "must be a token id (an integer from 0 to 2^32-1)",
            })?;
        bytes.extend_from_slice(&id.to_le_bytes());
    }
    out.prompt_bytes = bytes;
    out.prompt_token_ids = Some(ids.len());
    Ok(())
}

/// Embeddings: a string, strings (joined with a space) or token ids (nothing to hash).
fn embeddings_input(input: Option<Value>, out: &mut ParsedBody) -> Result<(), InvalidRequest> {
    completions_prompt(input, out).map_err(|e| match e {
        InvalidRequest::MissingPrompt => InvalidRequest::MissingInput,
        InvalidRequest::InvalidField { reason, .. } => InvalidRequest::InvalidField {
            field: "input".into(),
            reason,
        },
        other => other,
    })
}

/// Responses API: `instructions` then `input` (a string, or the item array as JSON text).
fn responses_prompt(
    instructions: Option<&Value>,
    tools: Option<&Value>,
    input: Option<&Value>,
) -> Result<Vec<u8>, InvalidRequest> {
    let mut out = Vec::new();
    match instructions {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => out.extend_from_slice(s.as_bytes()),
        Some(_) => {
            return Err(InvalidRequest::InvalidField {
                field: "instructions".into(),
                reason: "must be a string",
            });
        }
    }
    // llm-d hashes instructions, tools, input in that order.
    out.extend_from_slice(&tools_prefix(tools));
    match input {
        Some(Value::String(s)) if !s.is_empty() => out.extend_from_slice(s.as_bytes()),
        Some(v @ Value::Array(items)) if !items.is_empty() => {
            serde_json::to_writer(&mut out, v).expect("a JSON value always serializes");
        }
        Some(Value::String(_)) | Some(Value::Array(_)) | Some(Value::Null) | None => {
            return Err(InvalidRequest::MissingInput);
        }
        Some(_) => {
            return Err(InvalidRequest::InvalidField {
                field: "input".into(),
                reason: "must be a string or an array of input items",
            });
        }
    }
    Ok(out)
}

/// Anthropic messages: `system` (string or blocks) then `messages`, as JSON text.
fn anthropic_prompt(
    system: Option<&Value>,
    messages: Option<&Value>,
) -> Result<Vec<u8>, InvalidRequest> {
    let mut out = Vec::new();
    match system {
        None | Some(Value::Null) => {}
        Some(v @ (Value::String(_) | Value::Array(_))) => {
            serde_json::to_writer(&mut out, v).expect("a JSON value always serializes");
        }
        Some(_) => {
            return Err(InvalidRequest::InvalidField {
                field: "system".into(),
                reason: "must be a string or an array of content blocks",
            });
        }
    }
    match messages {
        Some(v @ Value::Array(m)) if !m.is_empty() => {
            if let Some(i) = m.iter().position(|x| !x.is_object()) {
                return Err(field_err(i, "", "must be an object"));
            }
            serde_json::to_writer(&mut out, v).expect("a JSON value always serializes");
        }
        Some(Value::Array(_)) | Some(Value::Null) | None => {
            return Err(InvalidRequest::MissingMessages);
        }
        Some(_) => {
            return Err(InvalidRequest::InvalidField {
                field: "messages".into(),
                reason: "must be an array of message objects",
            });
        }
    }
    Ok(out)
}

fn read_u32(v: Option<&Value>, field: &'static str) -> Result<Option<u32>, InvalidRequest> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_u64().and_then(|v| u32::try_from(v).ok()) {
            Some(v) => Ok(Some(v)),
            None => Err(InvalidRequest::InvalidField {
                field: field.into(),
                reason: "must be a non-negative integer below 2^32",
            }),
        },
        Some(_) => Err(InvalidRequest::InvalidField {
            field: field.into(),
            reason: "must be an integer",
        }),
    }
}

fn completions_prompt(prompt: Option<Value>, out: &mut ParsedBody) -> Result<(), InvalidRequest> {
    match prompt {
        Some(Value::String(s)) if !s.is_empty() => {
            out.prompt_bytes = s.into_bytes();
            Ok(())
        }
        Some(Value::Array(items)) if !items.is_empty() => {
            if items.iter().all(Value::is_string) {
                let parts: Vec<&str> = items.iter().filter_map(Value::as_str).collect();
                out.prompt_bytes = parts.join(" ").into_bytes();
                Ok(())
            } else if items
                .iter()
                .all(|v| v.as_u64().is_some_and(|n| u32::try_from(n).is_ok()))
            {
                // Token ids: llm-d's PlainText() of a token prompt is empty, so nothing is hashed.
                out.prompt_token_ids = Some(items.len());
                Ok(())
            } else {
                Err(InvalidRequest::InvalidField {
                    field: "prompt".into(),
                    reason: "an array prompt must hold only strings or only token ids (u32)",
                })
            }
        }
        Some(Value::String(_)) | Some(Value::Array(_)) | Some(Value::Null) | None => {
            Err(InvalidRequest::MissingPrompt)
        }
        Some(_) => Err(InvalidRequest::InvalidField {
            field: "prompt".into(),
            reason: "must be a string or an array",
        }),
    }
}

/// Re-marshals `messages` as Go's `json.Marshal([]Message)` in llm-d does.
/// Content-block types llm-d's token estimator turns into multimodal features (what
/// `always-disagg-multimodal-decider` looks for).
const MULTIMODAL_BLOCK_TYPES: [&str; 4] = ["image_url", "video_url", "input_audio", "audio_url"];

/// Whether any Anthropic message carries an `image` content block.
fn anthropic_has_images(messages: Option<&Value>) -> bool {
    let Some(Value::Array(msgs)) = messages else {
        return false;
    };
    msgs.iter().any(|m| match m.get("content") {
        Some(Value::Array(blocks)) => blocks
            .iter()
            .any(|b| b.get("type").and_then(Value::as_str) == Some("image")),
        _ => false,
    })
}

fn chat_messages_json(
    messages: Option<&Value>,
    multimodal: &mut bool,
) -> Result<Vec<u8>, InvalidRequest> {
    let msgs = match messages {
        Some(Value::Array(m)) if !m.is_empty() => m,
        Some(Value::Array(_)) | Some(Value::Null) | None => {
            return Err(InvalidRequest::MissingMessages);
        }
        Some(_) => {
            return Err(InvalidRequest::InvalidField {
                field: "messages".into(),
                reason: "must be an array of message objects",
            });
        }
    };
    let mut out = Vec::with_capacity(64 * msgs.len());
    out.push(b'[');
    for (i, msg) in msgs.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_message(i, msg, &mut out, multimodal)?;
    }
    out.push(b']');
    Ok(out)
}

fn field_err(i: usize, field: &str, reason: &'static str) -> InvalidRequest {
    InvalidRequest::InvalidField {
        field: format!("messages[{i}]{field}"),
        reason,
    }
}

/// Go struct order: `role` (omitempty), then `content`.
fn write_message(
    i: usize,
    msg: &Value,
    out: &mut Vec<u8>,
    multimodal: &mut bool,
) -> Result<(), InvalidRequest> {
    let Value::Object(m) = msg else {
        return Err(field_err(i, "", "must be an object"));
    };
    out.push(b'{');
    match m.get("role") {
        Some(Value::String(r)) if !r.is_empty() => {
            out.extend_from_slice(b"\"role\":");
            write_go_string(r, out);
            out.push(b',');
        }
        Some(Value::String(_)) | Some(Value::Null) | None => {}
        Some(_) => return Err(field_err(i, ".role", "must be a string")),
    }
    out.extend_from_slice(b"\"content\":");
    match m.get("content") {
        Some(Value::String(s)) => write_go_string(s, out),
        None | Some(Value::Null) => out.extend_from_slice(b"\"\""),
        Some(Value::Array(blocks)) => {
            out.push(b'[');
            for (j, b) in blocks.iter().enumerate() {
                if j > 0 {
                    out.push(b',');
                }
                write_block(i, b, out, multimodal)?;
            }
            out.push(b']');
        }
        Some(_) => {
            return Err(field_err(
                i,
                ".content",
                "must be a string or an array of content blocks",
            ));
        }
    }
    out.push(b'}');
    Ok(())
}

fn str_field<'v>(
    i: usize,
    obj: &'v serde_json::Map<String, Value>,
    key: &str,
) -> Result<&'v str, InvalidRequest> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(""),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(field_err(
            i,
            ".content",
            "content block fields must be strings",
        )),
    }
}

fn sub_object<'v>(
    i: usize,
    obj: &'v serde_json::Map<String, Value>,
    key: &str,
) -> Result<Option<&'v serde_json::Map<String, Value>>, InvalidRequest> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(o)) => Ok(Some(o)),
        Some(_) => Err(field_err(
            i,
            ".content",
            "content block parts must be objects",
        )),
    }
}

/// Go struct `ContentBlock`: type, text (omitempty), image_url{url}, input_audio{data,format},
/// video_url{url}; the nested structs are never omitted (Go's omitempty ignores structs).
fn write_block(
    i: usize,
    block: &Value,
    out: &mut Vec<u8>,
    multimodal: &mut bool,
) -> Result<(), InvalidRequest> {
    let Value::Object(b) = block else {
        return Err(field_err(i, ".content", "content blocks must be objects"));
    };
    out.extend_from_slice(b"{\"type\":");
    let kind = str_field(i, b, "type")?;
    *multimodal |= MULTIMODAL_BLOCK_TYPES.contains(&kind);
    write_go_string(kind, out);
    let text = str_field(i, b, "text")?;
    if !text.is_empty() {
        out.extend_from_slice(b",\"text\":");
        write_go_string(text, out);
    }
    let empty = serde_json::Map::new();
    let image = sub_object(i, b, "image_url")?.unwrap_or(&empty);
    out.extend_from_slice(b",\"image_url\":{");
    write_opt_fields(i, image, &["url"], out)?;
    let audio = sub_object(i, b, "input_audio")?.unwrap_or(&empty);
    out.extend_from_slice(b"},\"input_audio\":{");
    write_opt_fields(i, audio, &["data", "format"], out)?;
    let video = sub_object(i, b, "video_url")?.unwrap_or(&empty);
    out.extend_from_slice(b"},\"video_url\":{");
    write_opt_fields(i, video, &["url"], out)?;
    out.extend_from_slice(b"}}");
    Ok(())
}

fn write_opt_fields(
    i: usize,
    obj: &serde_json::Map<String, Value>,
    keys: &[&str],
    out: &mut Vec<u8>,
) -> Result<(), InvalidRequest> {
    let mut first = true;
    for key in keys {
        let v = str_field(i, obj, key)?;
        if v.is_empty() {
            continue;
        }
        if !first {
            out.push(b',');
        }
        first = false;
        out.push(b'"');
        out.extend_from_slice(key.as_bytes());
        out.extend_from_slice(b"\":");
        write_go_string(v, out);
    }
    Ok(())
}

/// Tool definitions enter the prefix hash ahead of the prompt (llm-d v0.10, PR #1554:
/// chat completions and Anthropic messages hash `tools` before the messages, responses
/// between the instructions and the input), so requests
/// with the same messages and different tools do not share a prefix. A non-empty `tools`
/// array is written as Go's `json.Marshal` writes a decoded `[]any` (compact, keys sorted,
/// HTML-escaped strings); anything else adds nothing.
fn tools_prefix(tools: Option<&Value>) -> Vec<u8> {
    let mut out = Vec::new();
    if let Some(v @ Value::Array(a)) = tools
        && !a.is_empty()
    {
        write_go_value(v, &mut out);
    }
    out
}

/// Writes a decoded JSON value as Go's `encoding/json` writes the same `any`: objects with
/// keys sorted, no spaces, strings as [`write_go_string`].
fn write_go_value(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Value::Number(n) => out.extend_from_slice(n.to_string().as_bytes()),
        Value::String(s) => write_go_string(s, out),
        Value::Array(a) => {
            out.push(b'[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_go_value(x, out);
            }
            out.push(b']');
        }
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push(b'{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_go_string(k, out);
                out.push(b':');
                write_go_value(&m[k], out);
            }
            out.push(b'}');
        }
    }
}

/// Writes a JSON string exactly as Go's `encoding/json` does with HTML escaping on:
/// `<`, `>`, `&`, U+2028 and U+2029 become `\u` escapes; `\b \f \n \r \t` use short forms.
pub fn write_go_string(s: &str, out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        let esc: Option<&[u8]> = match b {
            b'"' => Some(b"\\\""),
            b'\\' => Some(b"\\\\"),
            b'\n' => Some(b"\\n"),
            b'\r' => Some(b"\\r"),
            b'\t' => Some(b"\\t"),
            0x08 => Some(b"\\b"),
            0x0c => Some(b"\\f"),
            _ => None,
        };
        if let Some(e) = esc {
            out.extend_from_slice(&bytes[start..i]);
            out.extend_from_slice(e);
            i += 1;
            start = i;
            continue;
        }
        if b < 0x20 || b == b'<' || b == b'>' || b == b'&' {
            out.extend_from_slice(&bytes[start..i]);
            out.extend_from_slice(b"\\u00");
            out.push(HEX[(b >> 4) as usize]);
            out.push(HEX[(b & 0xf) as usize]);
            i += 1;
            start = i;
            continue;
        }
        // U+2028 / U+2029 are E2 80 A8 / E2 80 A9 in UTF-8.
        if b == 0xE2 && i + 2 < bytes.len() && bytes[i + 1] == 0x80 && (bytes[i + 2] & 0xFE) == 0xA8
        {
            out.extend_from_slice(&bytes[start..i]);
            out.extend_from_slice(if bytes[i + 2] == 0xA8 {
                b"\\u2028"
            } else {
                b"\\u2029"
            });
            i += 3;
            start = i;
            continue;
        }
        i += 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completions_string_prompt() {
        let p = parse_openai(
            ApiKind::Completions,
            br#"{"model":"m","prompt":"hello","stream":true,"max_tokens":7,"cache_salt":"s"}"#,
        )
        .unwrap();
        assert_eq!(p.model, "m");
        assert_eq!(p.prompt_bytes, b"hello");
        assert!(p.stream);
        assert_eq!(p.max_tokens, Some(7));
        assert_eq!(p.cache_salt.as_deref(), Some("s"));
    }

    #[test]
    fn completions_array_prompt_joined_with_space() {
        let p = parse_openai(
            ApiKind::Completions,
            br#"{"model":"m","prompt":["a","b c"]}"#,
        )
        .unwrap();
        assert_eq!(p.prompt_bytes, b"a b c");
        let t = parse_openai(ApiKind::Completions, br#"{"model":"m","prompt":[1,2,3]}"#).unwrap();
        assert!(t.prompt_bytes.is_empty());
        assert_eq!(t.prompt_token_ids, Some(3));
    }

    #[test]
    fn errors_name_the_problem() {
        let e = parse_openai(ApiKind::Completions, b"{not json").unwrap_err();
        assert!(matches!(e, InvalidRequest::BadJson(_)));
        let e = parse_openai(ApiKind::Completions, br#"{"prompt":"x"}"#).unwrap_err();
        assert_eq!(e, InvalidRequest::MissingModel);
        let e = parse_openai(ApiKind::Completions, br#"{"model":"m"}"#).unwrap_err();
        assert_eq!(e, InvalidRequest::MissingPrompt);
        let e =
            parse_openai(ApiKind::ChatCompletions, br#"{"model":"m","messages":[]}"#).unwrap_err();
        assert_eq!(e, InvalidRequest::MissingMessages);
        let e = parse_openai(
            ApiKind::ChatCompletions,
            br#"{"model":"m","messages":[{"role":"user","content":5}]}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("messages[0].content"), "{e}");
        let e = parse_openai(
            ApiKind::Completions,
            br#"{"model":"m","prompt":"x","max_tokens":-1}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("max_tokens"), "{e}");
    }

    #[test]
    fn multimodal_parts_are_reported_by_the_one_parse() {
        let chat = |content: &str| {
            let body =
                format!(r#"{{"model":"m","messages":[{{"role":"user","content":{content}}}]}}"#);
            parse_openai(ApiKind::ChatCompletions, body.as_bytes()).unwrap()
        };
        let before = body_parses_on_this_thread();
        assert!(
            chat(r#"[{"type":"text","text":"a"},{"type":"image_url","image_url":{"url":"u"}}]"#)
                .multimodal
        );
        assert_eq!(body_parses_on_this_thread(), before + 1, "no second parse");
        for kind in ["video_url", "input_audio", "audio_url"] {
            assert!(
                chat(&format!(r#"[{{"type":"{kind}"}}]"#)).multimodal,
                "{kind}"
            );
        }
        assert!(!chat(r#"[{"type":"text","text":"image_url"}]"#).multimodal);
        assert!(!chat(r#""see image_url""#).multimodal);
        let anthropic = |blocks: &str| {
            let body = format!(
                r#"{{"model":"m","max_tokens":5,"messages":[{{"role":"user","content":{blocks}}}]}}"#
            );
            parse_openai(ApiKind::AnthropicMessages, body.as_bytes())
                .unwrap()
                .multimodal
        };
        assert!(anthropic(
            r#"[{"type":"image","source":{"type":"base64","data":"x"}}]"#
        ));
        assert!(!anthropic(r#"[{"type":"text","text":"hi"}]"#));
        let p = parse_openai(
            ApiKind::Completions,
            br#"{"model":"m","prompt":"image_url"}"#,
        )
        .unwrap();
        assert!(!p.multimodal);
    }

    #[test]
    fn chat_messages_marshal_like_go() {
        // Field order role, content; extra keys dropped; Go's HTML-safe escaping.
        let p = parse_openai(
            ApiKind::ChatCompletions,
            br#"{"model":"m","messages":[{"content":"a<b>&\"\u2028","role":"system","name":"x"},{"role":"user","content":[{"type":"text","text":"hi"},{"type":"image_url","image_url":{"url":"u"}}]},{"role":"assistant"}]}"#,
        )
        .unwrap();
        let expected = concat!(
            r#"[{"role":"system","content":"a\u003cb\u003e\u0026\"\u2028"},"#,
            r#"{"role":"user","content":[{"type":"text","text":"hi","image_url":{},"input_audio":{},"video_url":{}},"#,
            r#"{"type":"image_url","image_url":{"url":"u"},"input_audio":{},"video_url":{}}]},"#,
            r#"{"role":"assistant","content":""}]"#
        );
        assert_eq!(String::from_utf8(p.prompt_bytes).unwrap(), expected);
    }

    #[test]
    fn go_string_escapes_controls() {
        let mut out = Vec::new();
        write_go_string("a\u{1}\u{8}\u{c}\n\t\u{7f}é", &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "\"a\\u0001\\b\\f\\n\\t\u{7f}é\""
        );
    }

    #[test]
    fn vllm_generate_reads_token_ids_and_sampling_params() {
        let p = parse_openai(
            ApiKind::VllmGenerate,
            br#"{"token_ids":[1,2,258],"sampling_params":{"max_tokens":128,"temperature":0.8},"stream":true,"cache_salt":"s"}"#,
        )
        .unwrap();
        assert_eq!(p.model, "", "model is optional");
        assert_eq!(p.max_tokens, Some(128));
        assert!(p.stream);
        assert_eq!(p.cache_salt.as_deref(), Some("s"));
        assert_eq!(p.prompt_token_ids, Some(3));
        assert_eq!(p.prompt_bytes, [1, 0, 0, 0, 2, 0, 0, 0, 2, 1, 0, 0]);
        let p = parse_openai(ApiKind::VllmGenerate, br#"{"model":"m","token_ids":[7]}"#).unwrap();
        assert_eq!(p.model, "m");
        assert_eq!(p.max_tokens, None);
    }

    #[test]
    fn vllm_generate_errors_name_the_field() {
        for (body, want) in [
            (
                &br#"{"token_ids":[]}"#[..],
                "must have non-empty token_ids field",
            ),
            (br#"{"model":"m"}"#, "must have non-empty token_ids field"),
            (br#"{"token_ids":[1,2,-1]}"#, "token_ids[2]"),
            (br#"{"token_ids":[1,4294967296]}"#, "token_ids[1]"),
            (br#"{"token_ids":"1 2"}"#, "\"token_ids\""),
            (
                br#"{"token_ids":[1],"sampling_params":[]}"#,
                "sampling_params",
            ),
            (
                br#"{"token_ids":[1],"sampling_params":{"max_tokens":-3}}"#,
                "sampling_params.max_tokens",
            ),
        ] {
            let e = parse_openai(ApiKind::VllmGenerate, body)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{}: {e}", String::from_utf8_lossy(body));
        }
        // Every other parser still needs a model.
        assert_eq!(
            parse_openai(ApiKind::Completions, br#"{"prompt":"x"}"#),
            Err(InvalidRequest::MissingModel)
        );
    }

    #[test]
    fn every_parser_reads_model_and_prompt() {
        let p = parse_openai(ApiKind::Embeddings, br#"{"model":"e","input":["a","b"]}"#).unwrap();
        assert_eq!(
            (p.model.as_str(), p.prompt_bytes.as_slice()),
            ("e", &b"a b"[..])
        );
        let e = parse_openai(ApiKind::Embeddings, br#"{"model":"e"}"#).unwrap_err();
        assert_eq!(e, InvalidRequest::MissingInput);
        let p = parse_openai(
            ApiKind::Responses,
            br#"{"model":"r","instructions":"be brief","input":"hi","max_output_tokens":9}"#,
        )
        .unwrap();
        assert_eq!(p.prompt_bytes, b"be briefhi");
        assert_eq!(p.max_tokens, Some(9));
        let p = parse_openai(
            ApiKind::AnthropicMessages,
            br#"{"model":"c","system":"sys","max_tokens":5,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(p.prompt_bytes).unwrap(),
            r#""sys"[{"content":"hi","role":"user"}]"#
        );
        assert!(p.stream);
        let e = parse_openai(
            ApiKind::AnthropicMessages,
            br#"{"model":"c","messages":[]}"#,
        )
        .unwrap_err();
        assert_eq!(e, InvalidRequest::MissingMessages);
        let p = parse_openai(ApiKind::Passthrough, b"not even json").unwrap();
        assert_eq!(p, ParsedBody::default());
    }

    #[test]
    fn tool_definitions_enter_the_hashed_prompt_ahead_of_the_messages() {
        let chat = |tools: &str| {
            let body = format!(
                r#"{{"model":"m","tools":{tools},"messages":[{{"role":"user","content":"hi"}}]}}"#
            );
            parse_openai(ApiKind::ChatCompletions, body.as_bytes())
                .unwrap()
                .prompt_bytes
        };
        let plain = chat("[]");
        assert_eq!(
            plain, br#"[{"role":"user","content":"hi"}]"#,
            "no tools: unchanged"
        );
        assert_eq!(chat("null"), plain);
        let weather =
            r#"[{"type":"function","function":{"name":"w","parameters":{"b":1,"a":"<x>"}}}]"#;
        let got = chat(weather);
        assert_eq!(
            String::from_utf8(got.clone()).unwrap(),
            r#"[{"function":{"name":"w","parameters":{"a":"\u003cx\u003e","b":1}},"type":"function"}][{"role":"user","content":"hi"}]"#,
            "Go's json.Marshal of []any: sorted keys, HTML escapes, then the messages"
        );
        assert_eq!(chat(weather), got, "same tools, same bytes");
        assert_ne!(chat(&weather.replace("\"w\"", "\"v\"")), got);
        let anthropic = parse_openai(
            ApiKind::AnthropicMessages,
            br#"{"model":"c","tools":[{"name":"t","input_schema":{}}],"system":"s","messages":[{"role":"user","content":"hi"}]}"#,
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(anthropic.prompt_bytes).unwrap(),
            r#"[{"input_schema":{},"name":"t"}]"s"[{"content":"hi","role":"user"}]"#
        );
        let responses = parse_openai(
            ApiKind::Responses,
            br#"{"model":"r","instructions":"be brief","tools":[{"type":"web_search"}],"input":"hi"}"#,
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(responses.prompt_bytes).unwrap(),
            r#"be brief[{"type":"web_search"}]hi"#
        );
    }

    #[test]
    fn with_model_splices_the_target_and_keeps_every_other_byte() {
        let body = br#"{ "prompt" : "x\"y",  "model" : "alias" , "n":1}"#;
        let p = parse_openai(ApiKind::Completions, body).unwrap();
        assert_eq!(&body[p.model_span.clone()], br#""alias""#);
        let out = p.with_model(body, "tar\"get");
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{ "prompt" : "x\"y",  "model" : "tar\"get" , "n":1}"#
        );
        let before = body_parses_on_this_thread();
        let _ = parse_openai(ApiKind::Completions, body).unwrap();
        assert_eq!(body_parses_on_this_thread(), before + 1);
    }

    #[test]
    fn non_objects_and_duplicate_fields_are_refused() {
        assert_eq!(
            parse_openai(ApiKind::Completions, b" [1]").unwrap_err(),
            InvalidRequest::NotAnObject
        );
        let e = parse_openai(
            ApiKind::Completions,
            br#"{"model":"a","model":"b","prompt":"x"}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("duplicate field"), "{e}");
    }
}
