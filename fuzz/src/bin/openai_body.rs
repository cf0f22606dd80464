//! The OpenAI/Anthropic/vLLM request-body parser: first byte picks the API, the rest is
//! the body as a client sent it.
use infermesh_scheduler::ApiKind;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let Some((&k, body)) = data.split_first() else { return };
        let kind = match k % 6 {
            0 => ApiKind::Completions,
            1 => ApiKind::ChatCompletions,
            2 => ApiKind::Embeddings,
            3 => ApiKind::Responses,
            4 => ApiKind::AnthropicMessages,
            _ => ApiKind::VllmGenerate,
        };
        let _ = infermesh_scheduler::parse_openai(kind, body);
    });
}
