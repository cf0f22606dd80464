//! The token producer's backends (llm-d `token-producer`): the prompt's token ids for the
//! precise prefix producer.
//!
//! - `estimate`: the prompt bytes packed 4 to a token (llm-d's tokenizer-free default).
//!   Its ids match no engine's, so precise matches are not found with it.
//! - `local` (infermesh): a HuggingFace `tokenizer.json`, loaded once per path. Only a
//!   completion's prompt text is tokenized in-process; a chat request needs the model's
//!   chat template, so it is rendered by the model server like the `vllm` backend.
//! - `vllm`: vLLM's `/v1/completions/render` and `/v1/chat/completions/render` with the
//!   request's own body (after any model rewrite), at `vllm.url`, or at one of the
//!   request's candidate pods when no URL is set (every pod serves render).
//!
//! Results are cached by content (bounded by total tokens), so a repeated prompt costs a
//! hash, not a round trip. A vLLM generate request carries its token ids and needs none of
//! this.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use infermesh_scheduler::ApiKind;
use infermesh_scheduler::config::precise::{TokenBackend, TokenProducerParams};
use quick_cache::Weighter;
use quick_cache::sync::Cache;
use xxhash_rust::xxh3::Xxh3;

use crate::upstream::HttpClient;

/// Tokens held by the result cache before the least recently used results go (64 MiB).
const CACHE_TOKENS: u64 = 16 << 20;

/// Why a prompt could not be tokenized (the request is then scored without prefix data).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenizeError {
    /// The local tokenizer file could not be loaded.
    #[error("tokenizer {path}: {message}")]
    Load {
        /// The `local.tokenizerPath`.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// The tokenizer refused the text.
    #[error("tokenizer {path} could not encode the prompt: {message}")]
    Encode {
        /// The `local.tokenizerPath`.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// No render endpoint: no `vllm.url` and no candidate pod.
    #[error("no render endpoint: set token-producer vllm.url, or have a candidate pod")]
    NoRenderEndpoint,
    /// The render call failed or timed out.
    #[error("render at {url}: {message}")]
    Render {
        /// The URL called.
        url: String,
        /// What went wrong.
        message: String,
    },
}

/// Which backend produced a result (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Byte packing.
    Estimate,
    /// The local tokenizer.json.
    Local,
    /// A render endpoint.
    Render,
    /// The generate request's own ids.
    Request,
}

impl Source {
    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Estimate => "estimate",
            Source::Local => "local",
            Source::Render => "render",
            Source::Request => "request",
        }
    }
}

/// One request's input to tokenization.
#[derive(Debug, Clone)]
pub struct TokenizeInput {
    /// The API the body follows.
    pub kind: ApiKind,
    /// The model the request goes to (after rewrite).
    pub model: String,
    /// The request body as the model server will get it (model rewritten).
    pub body: Bytes,
    /// What the parser extracted as the prompt (completion text; generate ids as LE u32).
    pub prompt_bytes: Arc<[u8]>,
    /// A candidate pod for render when `vllm.url` is unset.
    pub pod: Option<SocketAddr>,
}

#[derive(Clone)]
struct TokenWeight;

impl Weighter<u64, Arc<[u32]>> for TokenWeight {
    fn weight(&self, _key: &u64, val: &Arc<[u32]>) -> u64 {
        val.len() as u64 + 1
    }
}

/// The node's tokenizers: loaded local files and the shared result cache.
pub struct Tokenizers {
    client: HttpClient,
    local: ArcSwap<HashMap<String, Arc<tokenizers::Tokenizer>>>,
    cache: Cache<u64, Arc<[u32]>, TokenWeight>,
}

impl std::fmt::Debug for Tokenizers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizers")
            .field("local", &self.local.load().keys().collect::<Vec<_>>())
            .field("cached", &self.cache.len())
            .finish()
    }
}

impl Tokenizers {
    /// Tokenizers calling render endpoints with `client`.
    pub fn new(client: HttpClient) -> Tokenizers {
        Tokenizers {
            client,
            local: ArcSwap::from_pointee(HashMap::new()),
            cache: Cache::with_weighter(8192, CACHE_TOKENS, TokenWeight),
        }
    }

    /// Loads (once) the local tokenizer at `path`.
    pub fn load_local(&self, path: &str) -> Result<Arc<tokenizers::Tokenizer>, TokenizeError> {
        if let Some(t) = self.local.load().get(path) {
            return Ok(t.clone());
        }
        let t = tokenizers::Tokenizer::from_file(path).map_err(|e| TokenizeError::Load {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let t = Arc::new(t);
        self.local.rcu(|m| {
            let mut m = HashMap::clone(m);
            m.insert(path.to_owned(), t.clone());
            m
        });
        Ok(t)
    }

    /// Checks that `params` can work (a local file loads) before serving with them.
    pub fn prepare(&self, params: &TokenProducerParams) -> Result<(), TokenizeError> {
        if let Some(l) = &params.local {
            self.load_local(&l.tokenizer_path)?;
        }
        Ok(())
    }

    /// The prompt's token ids under `params`, and where they came from.
    pub async fn tokenize(
        &self,
        params: &TokenProducerParams,
        input: &TokenizeInput,
    ) -> Result<(Arc<[u32]>, Source, bool), TokenizeError> {
        if input.kind == ApiKind::VllmGenerate {
            return Ok((unpack_ids(&input.prompt_bytes), Source::Request, false));
        }
        let backend = params.backend();
        let in_process = match backend {
            TokenBackend::Estimate => Some(Source::Estimate),
            TokenBackend::Local if input.kind == ApiKind::Completions => Some(Source::Local),
            TokenBackend::Local | TokenBackend::VllmRender => None,
        };
        let render = params.render();
        let key = {
            let mut h = Xxh3::new();
            match in_process {
                Some(Source::Local) => {
                    h.update(b"local\0");
                    if let Some(l) = &params.local {
                        h.update(l.tokenizer_path.as_bytes());
                    }
                    h.update(b"\0");
                    h.update(&input.prompt_bytes);
                }
                Some(_) => {
                    h.update(b"estimate\0");
                    h.update(&input.prompt_bytes);
                }
                None => {
                    // Every pod of the model renders alike, so the pod is not in the key.
                    h.update(b"render\0");
                    h.update(render.base_url().unwrap_or("").as_bytes());
                    h.update(b"\0");
                    h.update(&[input.kind as u8]);
                    h.update(&input.body);
                }
            }
            h.digest()
        };
        let source = in_process.unwrap_or(Source::Render);
        if let Some(hit) = self.cache.get(&key) {
            return Ok((hit, source, true));
        }
        let tokens: Arc<[u32]> = match in_process {
            Some(Source::Local) => {
                let path = &params.local.as_ref().expect("local backend").tokenizer_path;
                let t = self.load_local(path)?;
                let text = String::from_utf8_lossy(&input.prompt_bytes);
                let enc = t
                    .encode(text.as_ref(), false)
                    .map_err(|e| TokenizeError::Encode {
                        path: path.clone(),
                        message: e.to_string(),
                    })?;
                enc.get_ids().into()
            }
            Some(_) => estimate(&input.prompt_bytes),
            None => self.render(&render, input).await?,
        };
        self.cache.insert(key, tokens.clone());
        Ok((tokens, source, false))
    }

    async fn render(
        &self,
        render: &infermesh_scheduler::config::precise::VllmRenderParams,
        input: &TokenizeInput,
    ) -> Result<Arc<[u32]>, TokenizeError> {
        let base = match (render.base_url(), input.pod) {
            (Some(u), _) => u.to_owned(),
            (None, Some(pod)) => format!("http://{pod}"),
            (None, None) => return Err(TokenizeError::NoRenderEndpoint),
        };
        let path = match input.kind {
            ApiKind::Completions => "/v1/completions/render",
            _ => "/v1/chat/completions/render",
        };
        let url = format!("{base}{path}");
        let fail = |message: String| TokenizeError::Render {
            url: url.clone(),
            message,
        };
        let req = http::Request::post(&url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(input.body.clone()))
            .map_err(|e| fail(e.to_string()))?;
        let call = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| fail(e.to_string()))?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| fail(e.to_string()))?
                .to_bytes();
            if !status.is_success() {
                let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
                return Err(fail(format!("status {status}: {text}")));
            }
            parse_render(&body).map_err(fail)
        };
        match tokio::time::timeout(render.timeout.max(Duration::from_millis(1)), call).await {
            Ok(r) => r,
            Err(_) => Err(fail(format!("no answer within {:?}", render.timeout))),
        }
    }
}

/// llm-d's `estimate` backend: bytes packed 4 to a token, little-endian, the last one
/// zero-padded. Prefix-stable, like the engine's tokens, but not the engine's ids.
pub fn estimate(bytes: &[u8]) -> Arc<[u32]> {
    bytes
        .chunks(4)
        .map(|c| {
            let mut w = [0u8; 4];
            w[..c.len()].copy_from_slice(c);
            u32::from_le_bytes(w)
        })
        .collect()
}

/// A generate request's ids, as the parser stored them (4-byte little-endian words).
fn unpack_ids(bytes: &[u8]) -> Arc<[u32]> {
    bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// The token ids of a render answer: vLLM's list of generate requests (`token_ids`), one
/// object, or the older `prompt_token_ids`.
fn parse_render(body: &[u8]) -> Result<Arc<[u32]>, String> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("answer is not JSON: {e}"))?;
    let obj = match &v {
        serde_json::Value::Array(items) => items.first().ok_or("answer is an empty list")?,
        other => other,
    };
    let ids = obj
        .get("token_ids")
        .or_else(|| obj.get("prompt_token_ids"))
        .and_then(|x| x.as_array())
        .ok_or("answer has no token_ids")?;
    ids.iter()
        .map(|t| {
            t.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| format!("token id {t} is not a u32"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimate_packs_four_bytes() {
        assert_eq!(
            &*estimate(b"abcdef"),
            &[
                u32::from_le_bytes(*b"abcd"),
                u32::from_le_bytes([b'e', b'f', 0, 0])
            ]
        );
        // Prefix-stable at 4-byte boundaries.
        assert_eq!(&estimate(b"abcdefgh")[..1], &estimate(b"abcdXYZ")[..1]);
    }

    #[test]
    fn render_answers() {
        assert_eq!(
            &*parse_render(br#"[{"model":"m","token_ids":[1,2,3]}]"#).unwrap(),
            &[1, 2, 3]
        );
        assert_eq!(
            &*parse_render(br#"{"prompt_token_ids":[7]}"#).unwrap(),
            &[7]
        );
        assert!(parse_render(b"[]").unwrap_err().contains("empty"));
        assert!(
            parse_render(br#"{"x":1}"#)
                .unwrap_err()
                .contains("token_ids")
        );
        assert!(
            parse_render(br#"{"token_ids":[-1]}"#)
                .unwrap_err()
                .contains("u32")
        );
        assert!(parse_render(b"nope").unwrap_err().contains("JSON"));
    }

    fn input(kind: ApiKind, prompt: &[u8]) -> TokenizeInput {
        TokenizeInput {
            kind,
            model: "m".into(),
            body: Bytes::from_static(b"{}"),
            prompt_bytes: prompt.into(),
            pod: None,
        }
    }

    #[tokio::test]
    async fn backends_and_cache() {
        let t = Tokenizers::new(crate::upstream::http_client(Duration::from_secs(1)));
        let est = TokenProducerParams::default();
        let (ids, src, cached) = t
            .tokenize(&est, &input(ApiKind::Completions, b"hello world"))
            .await
            .unwrap();
        assert_eq!((src, cached), (Source::Estimate, false));
        assert_eq!(ids.len(), 3);
        let (_, _, cached) = t
            .tokenize(&est, &input(ApiKind::Completions, b"hello world"))
            .await
            .unwrap();
        assert!(cached);
        // Generate requests carry their ids.
        let mut raw = Vec::new();
        for id in [5u32, 6] {
            raw.extend_from_slice(&id.to_le_bytes());
        }
        let (ids, src, _) = t
            .tokenize(&est, &input(ApiKind::VllmGenerate, &raw))
            .await
            .unwrap();
        assert_eq!((&*ids, src), (&[5u32, 6][..], Source::Request));
        // Render with neither a URL nor a pod cannot work, and says so.
        let render: TokenProducerParams = serde_yaml_ng::from_str("modelName: m").unwrap();
        let e = t
            .tokenize(&render, &input(ApiKind::ChatCompletions, b"x"))
            .await
            .unwrap_err();
        assert_eq!(e, TokenizeError::NoRenderEndpoint);
        // A missing local file is named.
        let local: TokenProducerParams =
            serde_yaml_ng::from_str("local: {tokenizerPath: /nonexistent/tokenizer.json}").unwrap();
        let e = t.prepare(&local).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/tokenizer.json"), "{e}");
    }
}
