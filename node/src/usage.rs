//! Reads the OpenAI `usage` object out of a response body as it streams by, without
//! holding the body: SSE events are scanned line by line, a plain JSON body is kept only
//! up to a bound. It also times the body's chunks, for llm-d's TTFT, TPOT and ITL
//! histograms.

use std::time::Instant;

/// Gaps between body chunks kept per response for the ITL histogram (the rest are
/// dropped: a long stream's first thousand gaps describe its pacing well enough).
const MAX_GAPS: usize = 1024;

/// What one response's body showed as it streamed by.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ResponseReport {
    /// The usage the model server reported, if it did.
    pub usage: Option<Usage>,
    /// Body bytes passed through.
    pub bytes: u64,
    /// When the first non-empty body chunk arrived.
    pub first_chunk: Option<Instant>,
    /// When the last non-empty body chunk arrived.
    pub last_chunk: Option<Instant>,
    /// Seconds between consecutive non-empty chunks (at most [`MAX_GAPS`]).
    pub gaps: Vec<f32>,
}

/// Token counts a model server reported for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// `usage.prompt_tokens`
    pub prompt_tokens: u64,
    /// `usage.completion_tokens`
    pub completion_tokens: u64,
    /// `usage.prompt_tokens_details.cached_tokens`
    pub cached_tokens: u64,
}

// A non-streaming completion carries its usage at the end of a body of this size at most;
// larger bodies are passed through without a usage reading.
const MAX_JSON_BODY: usize = 1 << 20;
// One SSE line longer than this is skipped rather than buffered.
const MAX_SSE_LINE: usize = 256 << 10;

/// Incremental usage reader for one response.
#[derive(Debug, Default)]
pub struct UsageScanner {
    sse: Option<bool>,
    buf: Vec<u8>,
    overflow: bool,
    found: Option<Usage>,
    bytes: u64,
    first_chunk: Option<Instant>,
    last_chunk: Option<Instant>,
    gaps: Vec<f32>,
}

impl UsageScanner {
    /// A scanner for a response whose `content-type` is `content_type` (SSE or JSON).
    pub fn new(content_type: Option<&str>) -> UsageScanner {
        UsageScanner {
            sse: content_type.map(|c| c.starts_with("text/event-stream")),
            ..Default::default()
        }
    }

    /// Feeds the next body chunk.
    pub fn feed(&mut self, chunk: &[u8]) {
        self.feed_at(chunk, Instant::now());
    }

    /// [`Self::feed`] with the chunk's arrival time.
    pub fn feed_at(&mut self, chunk: &[u8], now: Instant) {
        if !chunk.is_empty() {
            self.bytes += chunk.len() as u64;
            if let Some(last) = self.last_chunk
                && self.gaps.len() < MAX_GAPS
            {
                self.gaps
                    .push(now.saturating_duration_since(last).as_secs_f32());
            }
            self.first_chunk.get_or_insert(now);
            self.last_chunk = Some(now);
        }
        if self.sse.is_none() {
            // No content type: decide from the first bytes.
            let first = chunk.iter().find(|b| !b.is_ascii_whitespace());
            match first {
                Some(b'{') | Some(b'[') => self.sse = Some(false),
                Some(_) => self.sse = Some(true),
                None => return,
            }
        }
        if self.overflow {
            return;
        }
        if self.sse == Some(true) {
            for &b in chunk {
                if b == b'\n' {
                    self.sse_line();
                    self.buf.clear();
                } else if self.buf.len() < MAX_SSE_LINE {
                    self.buf.push(b);
                }
            }
        } else if self.buf.len() + chunk.len() <= MAX_JSON_BODY {
            self.buf.extend_from_slice(chunk);
        } else {
            self.overflow = true;
            self.buf = Vec::new();
        }
    }

    fn sse_line(&mut self) {
        let line = self.buf.strip_suffix(b"\r").unwrap_or(&self.buf);
        let Some(data) = line.strip_prefix(b"data:") else {
            return;
        };
        let data = data.trim_ascii();
        if data == b"[DONE]" || !contains(data, b"\"usage\"") {
            return;
        }
        if let Some(u) = parse_usage(data) {
            self.found = Some(u);
        }
    }

    /// The usage and timings, once the body has ended.
    pub fn report(mut self) -> ResponseReport {
        let gaps = std::mem::take(&mut self.gaps);
        let (bytes, first_chunk, last_chunk) = (self.bytes, self.first_chunk, self.last_chunk);
        ResponseReport {
            usage: self.finish(),
            bytes,
            first_chunk,
            last_chunk,
            gaps,
        }
    }

    /// The usage reported, once the body has ended.
    pub fn finish(mut self) -> Option<Usage> {
        if self.sse == Some(true) {
            if !self.buf.is_empty() {
                self.sse_line();
            }
            self.found
        } else if self.overflow {
            None
        } else {
            parse_usage(&self.buf)
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn parse_usage(json: &[u8]) -> Option<Usage> {
    #[derive(serde::Deserialize)]
    struct Body {
        usage: Option<UsageDoc>,
    }
    #[derive(serde::Deserialize)]
    struct UsageDoc {
        #[serde(default)]
        prompt_tokens: u64,
        #[serde(default)]
        completion_tokens: u64,
        #[serde(default)]
        prompt_tokens_details: Option<Details>,
    }
    #[derive(serde::Deserialize)]
    struct Details {
        #[serde(default)]
        cached_tokens: Option<u64>,
    }
    let usage = |u: UsageDoc| Usage {
        prompt_tokens: u.prompt_tokens,
        completion_tokens: u.completion_tokens,
        cached_tokens: u
            .prompt_tokens_details
            .and_then(|d| d.cached_tokens)
            .unwrap_or(0),
    };
    // `usage` is the last field a model server writes, after the choices: read it from its
    // key instead of parsing the whole body (this parse was a tenth of the proxy's own
    // CPU per request). Anything unexpected falls back to the full parse.
    if let Some(at) = memchr::memmem::rfind(json, b"\"usage\"")
        && let Some(value) = json[at + 7..].trim_ascii_start().strip_prefix(b":")
    {
        let mut de = serde_json::Deserializer::from_slice(value);
        if let Ok(u) = <Option<UsageDoc> as serde::Deserialize>::deserialize(&mut de) {
            return u.map(usage);
        }
    }
    let body: Body = serde_json::from_slice(json).ok()?;
    body.usage.map(usage)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_is_read_from_its_key_or_from_the_whole_body() {
        let u = parse_usage(
            br#"{"choices":[{"text":"a \"usage\" word"}],"usage": {"prompt_tokens":3,"completion_tokens":2},"kv_transfer_params":null}"#,
        )
        .unwrap();
        assert_eq!((u.prompt_tokens, u.completion_tokens), (3, 2));
        // The last `"usage"` ends a string, not the key: the full parse still finds it.
        let u = parse_usage(
            br#"{"usage":{"prompt_tokens":4,"completion_tokens":1},"choices":[{"text":"\"usage"}]}"#,
        )
        .unwrap();
        assert_eq!((u.prompt_tokens, u.completion_tokens), (4, 1));
        assert_eq!(parse_usage(br#"{"usage":null}"#), None);
        assert_eq!(parse_usage(br#"{"choices":[]}"#), None);
    }

    #[test]
    fn json_body_split_across_chunks() {
        let body = br#"{"id":"x","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":5,"prompt_tokens_details":{"cached_tokens":8}}}"#;
        let mut s = UsageScanner::new(Some("application/json"));
        for c in body.chunks(7) {
            s.feed(c);
        }
        assert_eq!(
            s.finish(),
            Some(Usage {
                prompt_tokens: 12,
                completion_tokens: 5,
                cached_tokens: 8
            })
        );
    }

    #[test]
    fn sse_usage_in_the_last_event() {
        let body = b"data: {\"choices\":[{\"text\":\"a\"}],\"usage\":null}\n\n\
                     data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}\r\n\r\n\
                     data: [DONE]\n\n";
        let mut s = UsageScanner::new(None);
        for c in body.chunks(5) {
            s.feed(c);
        }
        let u = s.finish().unwrap();
        assert_eq!((u.prompt_tokens, u.completion_tokens), (3, 2));
    }

    #[test]
    fn no_usage() {
        let mut s = UsageScanner::new(Some("text/event-stream"));
        s.feed(b"data: {\"choices\":[]}\n\ndata: [DONE]\n\n");
        assert_eq!(s.finish(), None);
        let mut j = UsageScanner::new(Some("application/json"));
        j.feed(b"{\"error\":\"x\"}");
        assert_eq!(j.finish(), None);
    }
}
