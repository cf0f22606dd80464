//! Server-sent events as OpenAI streams them: a sans-IO line decoder and the chunk
//! fields the benchmark reads.

use serde::Deserialize;

/// Splits a byte stream into SSE `data:` payloads, whatever the chunking.
#[derive(Debug, Default)]
pub struct SseDecoder {
    buf: Vec<u8>,
}

impl SseDecoder {
    /// Feeds bytes; calls `on_data` with each complete `data:` payload, in order.
    pub fn push(&mut self, bytes: &[u8], mut on_data: impl FnMut(&str)) {
        self.buf.extend_from_slice(bytes);
        let mut start = 0;
        while let Some(nl) = self.buf[start..].iter().position(|b| *b == b'\n') {
            let mut line = &self.buf[start..start + nl];
            start += nl + 1;
            if let Some(stripped) = line.strip_suffix(b"\r") {
                line = stripped;
            }
            if let Some(payload) = line.strip_prefix(b"data:") {
                let payload = payload.strip_prefix(b" ").unwrap_or(payload);
                if let Ok(text) = std::str::from_utf8(payload) {
                    on_data(text);
                }
            }
        }
        self.buf.drain(..start);
    }
}

/// What one streamed chunk contributes.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ChunkInfo {
    /// Content characters carried (text or delta content).
    pub content_chars: usize,
    /// `usage.completion_tokens`, when the chunk carries usage.
    pub completion_tokens: Option<u64>,
    /// `usage.prompt_tokens`, when present.
    pub prompt_tokens: Option<u64>,
    /// `usage.prompt_tokens_details.cached_tokens`, when present.
    pub cached_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    delta: Option<Delta>,
}

#[derive(Deserialize)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
}

#[derive(Deserialize)]
struct Usage {
    #[serde(default)]
    completion_tokens: Option<u64>,
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    prompt_tokens_details: Option<PromptDetails>,
}

#[derive(Deserialize)]
struct PromptDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

/// Parses one `data:` payload of a completions or chat stream (`None` for `[DONE]` or
/// a payload that is not a chunk).
pub fn parse_chunk(payload: &str) -> Option<ChunkInfo> {
    if payload.trim() == "[DONE]" {
        return None;
    }
    let c: Chunk = serde_json::from_str(payload).ok()?;
    let content_chars = c
        .choices
        .iter()
        .map(|ch| {
            ch.text.as_deref().map_or(0, str::len)
                + ch.delta
                    .as_ref()
                    .and_then(|d| d.content.as_deref())
                    .map_or(0, str::len)
        })
        .sum();
    let usage = c.usage.as_ref();
    Some(ChunkInfo {
        content_chars,
        completion_tokens: usage.and_then(|u| u.completion_tokens),
        prompt_tokens: usage.and_then(|u| u.prompt_tokens),
        cached_tokens: usage
            .and_then(|u| u.prompt_tokens_details.as_ref())
            .and_then(|d| d.cached_tokens),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_survive_any_split() {
        let stream = b"data: {\"a\":1}\n\ndata: {\"b\":2}\r\n\r\n: comment\ndata: [DONE]\n\n";
        for split in 0..stream.len() {
            let mut d = SseDecoder::default();
            let mut got = Vec::new();
            d.push(&stream[..split], |p| got.push(p.to_string()));
            d.push(&stream[split..], |p| got.push(p.to_string()));
            assert_eq!(
                got,
                ["{\"a\":1}", "{\"b\":2}", "[DONE]"],
                "split at {split}"
            );
        }
    }

    #[test]
    fn chunk_fields_for_completions_and_chat() {
        let c = parse_chunk(r#"{"choices":[{"index":0,"text":"abc "}]}"#).unwrap();
        assert_eq!(c.content_chars, 4);
        let c = parse_chunk(r#"{"choices":[{"delta":{"role":"assistant"}}]}"#).unwrap();
        assert_eq!(c.content_chars, 0);
        let c = parse_chunk(r#"{"choices":[{"delta":{"content":"hi"}}]}"#).unwrap();
        assert_eq!(c.content_chars, 2);
        let c = parse_chunk(
            r#"{"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":3,"prompt_tokens_details":{"cached_tokens":4}}}"#,
        )
        .unwrap();
        assert_eq!(
            (c.completion_tokens, c.prompt_tokens, c.cached_tokens),
            (Some(3), Some(9), Some(4))
        );
        assert_eq!(parse_chunk("[DONE]"), None);
        assert_eq!(parse_chunk("not json"), None);
    }
}
