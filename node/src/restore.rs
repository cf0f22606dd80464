//! Gives a response its client-facing model name back after an InferenceModelRewrite: the
//! model server answers for the target model, the client asked for (and is billed for)
//! the name it sent, as GIE does. Works chunk by chunk on JSON and SSE bodies without
//! buffering them: a `"model"` key whose string value is the served model is rewritten;
//! a few bytes that could start such a key are held back until the next chunk.

use memchr::memmem;

const KEY: &[u8] = b"\"model\"";
/// Whitespace allowed around the `:` (JSON writers use none or one space).
const MAX_GAP: usize = 4;

/// Streaming `"model": "<served>"` → `"model": "<client>"` rewriter.
#[derive(Debug)]
pub struct ModelRestorer {
    from: Vec<u8>,
    to: Vec<u8>,
    carry: Vec<u8>,
}

impl ModelRestorer {
    /// Rewrites `served` back to `client` (both plain model names).
    pub fn new(served: &str, client: &str) -> ModelRestorer {
        let json = |s: &str| serde_json::to_vec(s).expect("a string always serializes");
        ModelRestorer {
            from: json(served),
            to: json(client),
            carry: Vec::new(),
        }
    }

    /// The rewritten bytes of `chunk` that are safe to pass on now.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<u8> {
        let mut buf = std::mem::take(&mut self.carry);
        buf.extend_from_slice(chunk);
        let mut out = Vec::with_capacity(buf.len());
        let mut pos = 0;
        let finder = memmem::Finder::new(KEY);
        while let Some(i) = finder.find(&buf[pos..]).map(|i| i + pos) {
            let mut j = i + KEY.len();
            let skip_ws = |j: &mut usize| {
                let start = *j;
                while *j < buf.len() && *j - start < MAX_GAP && buf[*j].is_ascii_whitespace() {
                    *j += 1;
                }
            };
            skip_ws(&mut j);
            let colon = buf.get(j).copied();
            if colon == Some(b':') {
                j += 1;
                skip_ws(&mut j);
            }
            let rest = &buf[j.min(buf.len())..];
            let undecided = colon.is_none()
                || (colon == Some(b':')
                    && rest.len() < self.from.len()
                    && self.from.starts_with(rest));
            if undecided {
                // The key or its value continues in the next chunk.
                out.extend_from_slice(&buf[pos..i]);
                self.carry = buf[i..].to_vec();
                return out;
            }
            if colon == Some(b':') && rest.starts_with(&self.from) {
                out.extend_from_slice(&buf[pos..j]);
                out.extend_from_slice(&self.to);
                pos = j + self.from.len();
            } else {
                out.extend_from_slice(&buf[pos..i + KEY.len()]);
                pos = i + KEY.len();
            }
        }
        // A key may start in the last few bytes: hold them back.
        let keep = (KEY.len() - 1).min(buf.len() - pos);
        let cut = buf.len() - keep;
        let tail_may_start_key = (cut..buf.len()).any(|k| KEY.starts_with(&buf[k..]));
        if tail_may_start_key {
            let k = (cut..buf.len())
                .find(|&k| KEY.starts_with(&buf[k..]))
                .expect("checked");
            out.extend_from_slice(&buf[pos..k]);
            self.carry = buf[k..].to_vec();
        } else {
            out.extend_from_slice(&buf[pos..]);
        }
        out
    }

    /// Whether bytes are held back for the next chunk.
    pub fn holds_bytes(&self) -> bool {
        !self.carry.is_empty()
    }

    /// The bytes still held back, at the end of the body.
    pub fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.carry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(r: &mut ModelRestorer, chunks: &[&[u8]]) -> String {
        let mut out = Vec::new();
        for c in chunks {
            out.extend(r.feed(c));
        }
        out.extend(r.finish());
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn restores_the_client_model_at_every_chunk_boundary() {
        let body = concat!(
            "data: {\"id\":\"1\",\"model\":\"served-m\",\"choices\":[{\"text\":\"model\"}]}\n\n",
            "data: {\"model\": \"served-m\", \"x\": \"\\\"model\\\":\\\"served-m\\\"\"}\n\n",
            "data: {\"model\":\"other\"}\n\ndata: [DONE]\n\n"
        );
        let want = body
            .replacen("\"model\":\"served-m\"", "\"model\":\"alias\"", 1)
            .replacen("\"model\": \"served-m\"", "\"model\": \"alias\"", 1);
        let whole = run(
            &mut ModelRestorer::new("served-m", "alias"),
            &[body.as_bytes()],
        );
        assert_eq!(whole, want);
        let b = body.as_bytes();
        for split in 0..b.len() {
            let got = run(
                &mut ModelRestorer::new("served-m", "alias"),
                &[&b[..split], &b[split..]],
            );
            assert_eq!(got, want, "split at {split}");
        }
        let bytes: Vec<&[u8]> = b.chunks(1).collect();
        assert_eq!(
            run(&mut ModelRestorer::new("served-m", "alias"), &bytes),
            want
        );
    }

    #[test]
    fn a_prefix_of_the_served_name_is_left_alone() {
        let body = b"{\"model\":\"served\"}";
        let got = run(&mut ModelRestorer::new("served-m", "alias"), &[body]);
        assert_eq!(got.as_bytes(), body);
    }
}
