//! One streaming (SSE) answer: token chunks, the usage chunk, `data: [DONE]`.

use axum::body::Bytes;
use tokio::sync::mpsc;

use super::error::ApiError;
use super::openai::*;
use super::submit::AbortOnDrop;
use crate::engine::FinishReason;
use crate::pod::Event;
use crate::tokenizer::filler_text;

/// State of one SSE response.
pub(super) struct SseStream {
    pub(super) rx: mpsc::UnboundedReceiver<Event>,
    pub(super) guard: AbortOnDrop,
    pub(super) id: String,
    pub(super) model: String,
    pub(super) created: u64,
    pub(super) chat: bool,
    pub(super) include_usage: bool,
    pub(super) max_tokens: usize,
    pub(super) finish: FinishReason,
    pub(super) done: bool,
}

impl SseStream {
    /// The next body frame: every event already delivered, so a burst of tokens (a fast
    /// pod) goes out in one write while a slow pod still streams token by token.
    pub(super) async fn next_chunk(&mut self) -> Option<Bytes> {
        if self.done {
            return None;
        }
        let first = self.rx.recv().await?;
        let mut out = Vec::with_capacity(256);
        self.render(first, &mut out);
        while !self.done {
            match self.rx.try_recv() {
                Ok(ev) => self.render(ev, &mut out),
                Err(_) => break,
            }
        }
        Some(Bytes::from(out))
    }

    fn render(&mut self, ev: Event, out: &mut Vec<u8>) {
        match ev {
            Event::Token { index } => {
                let last = index + 1 >= self.max_tokens;
                let finish = last.then(|| self.finish.as_str());
                if self.chat && index == 0 {
                    // vLLM sends the role with the first output, not before it.
                    self.chat_chunk(out, Some("assistant"), Some(""), None);
                }
                if self.chat {
                    self.chat_chunk(out, None, Some(filler_text(index)), finish);
                } else {
                    self.completion_chunk(out, filler_text(index), finish);
                }
            }
            Event::Done(c) => {
                self.guard.armed = false;
                self.done = true;
                if self.include_usage {
                    let usage = Usage::new(c.prompt_tokens, c.completion_tokens, c.cached_tokens);
                    let r = if self.chat {
                        serde_json::to_writer(
                            sse_start(out),
                            &ChatBody {
                                id: &self.id,
                                object: "chat.completion.chunk",
                                created: self.created,
                                model: &self.model,
                                choices: vec![],
                                usage: Some(usage),
                                kv_transfer_params: None,
                            },
                        )
                    } else {
                        serde_json::to_writer(
                            sse_start(out),
                            &CompletionBody {
                                id: &self.id,
                                object: "text_completion",
                                created: self.created,
                                model: &self.model,
                                choices: vec![],
                                usage: Some(usage),
                                kv_transfer_params: None,
                            },
                        )
                    };
                    if r.is_ok() {
                        out.extend_from_slice(b"\n\n");
                    }
                }
                out.extend_from_slice(b"data: [DONE]\n\n");
            }
            // Encode-only requests are answered whole, never streamed; should one end up
            // here, the stream simply ends.
            Event::Encoded { .. } => {
                self.guard.armed = false;
                self.done = true;
                out.extend_from_slice(b"data: [DONE]\n\n");
            }
            Event::Rejected(e) => {
                self.guard.armed = false;
                self.done = true;
                let err = ApiError::bad_request(e.to_string());
                if serde_json::to_writer(sse_start(out), &serde_json::json!({"error": err.body()}))
                    .is_ok()
                {
                    out.extend_from_slice(b"\n\n");
                }
                out.extend_from_slice(b"data: [DONE]\n\n");
            }
        }
    }

    fn completion_chunk(&self, out: &mut Vec<u8>, text: &str, finish: Option<&'static str>) {
        let body = CompletionBody {
            id: &self.id,
            object: "text_completion",
            created: self.created,
            model: &self.model,
            choices: vec![CompletionChoice {
                index: 0,
                text,
                logprobs: None,
                finish_reason: finish,
                stop_reason: None,
            }],
            usage: None,
            kv_transfer_params: None,
        };
        if serde_json::to_writer(sse_start(out), &body).is_ok() {
            out.extend_from_slice(b"\n\n");
        }
    }

    fn chat_chunk(
        &self,
        out: &mut Vec<u8>,
        role: Option<&'static str>,
        content: Option<&str>,
        finish: Option<&'static str>,
    ) {
        let body = ChatBody {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: &self.model,
            choices: vec![ChatChoice {
                index: 0,
                message: None,
                delta: Some(ChatMessageOut { role, content }),
                logprobs: None,
                finish_reason: finish,
            }],
            usage: None,
            kv_transfer_params: None,
        };
        if serde_json::to_writer(sse_start(out), &body).is_ok() {
            out.extend_from_slice(b"\n\n");
        }
    }
}

fn sse_start(out: &mut Vec<u8>) -> &mut Vec<u8> {
    out.extend_from_slice(b"data: ");
    out
}
