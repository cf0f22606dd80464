//! OpenAI request parsing (llm-d's `openai-parser`), shared by the ext_proc path and the proxy.
//!
//! The prompt bytes are what llm-d's approximate prefix producer hashes: the completions
//! prompt as plain text (string arrays joined with a space), or the chat `messages`
//! re-marshalled the way Go's `encoding/json` marshals llm-d's `[]Message` type
//! (`{"role":…,"content":…}` with Go's HTML-safe string escaping). Known difference: Go
//! matches JSON field names case-insensitively and takes the last duplicate key; this parser
//! is case-sensitive and rejects duplicate keys.

use serde_json::Value;

/// Which OpenAI API the body belongs to (from the request path).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiKind {
    /// `/v1/completions`
    Completions,
    /// `/v1/chat/completions`
    ChatCompletions,
}

impl ApiKind {
    /// Picks the API from a request path the way llm-d does (suffix match; completions by default).
    pub fn from_path(path: &str) -> ApiKind {
        let path = path.split('?').next().unwrap_or(path).trim_end_matches('/');
        if path.ends_with("/chat/completions") {
            ApiKind::ChatCompletions
        } else {
            ApiKind::Completions
        }
    }
}

/// The fields of an OpenAI body the scheduler needs.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ParsedBody {
    /// `model`
    pub model: String,
    /// The bytes llm-d hashes for prefix matching (see the module docs).
    pub prompt_bytes: Vec<u8>,
    /// `stream: true`
    pub stream: bool,
    /// `max_tokens`, else `max_completion_tokens`.
    pub max_tokens: Option<u32>,
    /// `cache_salt`, when present and non-empty.
    pub cache_salt: Option<String>,
    /// Number of prompt token ids when the completions prompt is a token array.
    pub prompt_token_ids: Option<usize>,
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
    /// Chat request without at least one message.
    #[error("invalid chat completions request: must have at least one message in \"messages\"")]
    MissingMessages,
    /// A field has the wrong type or value.
    #[error("invalid field \"{field}\": {reason}")]
    InvalidField {
        /// JSON path of the field, e.g. `messages[2].content`.
        field: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// Parses an OpenAI completions or chat-completions body.
pub fn parse_openai(kind: ApiKind, body: &[u8]) -> Result<ParsedBody, InvalidRequest> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| InvalidRequest::BadJson(e.to_string()))?;
    let Value::Object(obj) = value else {
        return Err(InvalidRequest::NotAnObject);
    };
    let model = match obj.get("model") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(Value::String(_)) | Some(Value::Null) | None => {
            return Err(InvalidRequest::MissingModel);
        }
        Some(_) => {
            return Err(InvalidRequest::InvalidField {
                field: "model".into(),
                reason: "must be a string",
            });
        }
    };
    let stream = matches!(obj.get("stream"), Some(Value::Bool(true)));
    let max_tokens = match read_u32(&obj, "max_tokens")? {
        Some(v) => Some(v),
        None => read_u32(&obj, "max_completion_tokens")?,
    };
    let cache_salt = match obj.get("cache_salt") {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
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
        stream,
        max_tokens,
        cache_salt,
        ..ParsedBody::default()
    };
    match kind {
        ApiKind::Completions => completions_prompt(obj.get("prompt"), &mut parsed)?,
        ApiKind::ChatCompletions => {
            parsed.prompt_bytes = chat_messages_json(obj.get("messages"))?;
        }
    }
    Ok(parsed)
}

fn read_u32(
    obj: &serde_json::Map<String, Value>,
    field: &'static str,
) -> Result<Option<u32>, InvalidRequest> {
    match obj.get(field) {
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

fn completions_prompt(prompt: Option<&Value>, out: &mut ParsedBody) -> Result<(), InvalidRequest> {
    match prompt {
        Some(Value::String(s)) if !s.is_empty() => {
            out.prompt_bytes = s.as_bytes().to_vec();
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
fn chat_messages_json(messages: Option<&Value>) -> Result<Vec<u8>, InvalidRequest> {
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
        write_message(i, msg, &mut out)?;
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
fn write_message(i: usize, msg: &Value, out: &mut Vec<u8>) -> Result<(), InvalidRequest> {
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
                write_block(i, b, out)?;
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
fn write_block(i: usize, block: &Value, out: &mut Vec<u8>) -> Result<(), InvalidRequest> {
    let Value::Object(b) = block else {
        return Err(field_err(i, ".content", "content blocks must be objects"));
    };
    out.extend_from_slice(b"{\"type\":");
    write_go_string(str_field(i, b, "type")?, out);
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
    fn api_kind_from_path() {
        assert_eq!(
            ApiKind::from_path("/v1/chat/completions"),
            ApiKind::ChatCompletions
        );
        assert_eq!(
            ApiKind::from_path("/v1/completions?x=1"),
            ApiKind::Completions
        );
    }
}
