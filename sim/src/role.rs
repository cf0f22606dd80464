//! The role a pod plays in prefill/decode disaggregation.

/// The role a pod plays in prefill/decode disaggregation (llm-d label `llm-d.ai/role`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum PodRole {
    /// Prefill and decode (an ordinary pod).
    #[default]
    Both,
    /// Prefill only.
    Prefill,
    /// Decode only.
    Decode,
    /// Multimodal encoder.
    Encode,
}

impl PodRole {
    /// The llm-d label value.
    pub fn as_str(self) -> &'static str {
        match self {
            PodRole::Both => "both",
            PodRole::Prefill => "prefill",
            PodRole::Decode => "decode",
            PodRole::Encode => "encode",
        }
    }
}

impl std::str::FromStr for PodRole {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "both" | "prefill-decode" => Ok(PodRole::Both),
            "prefill" => Ok(PodRole::Prefill),
            "decode" => Ok(PodRole::Decode),
            "encode" => Ok(PodRole::Encode),
            other => Err(format!(
                "unknown role `{other}` (expected prefill, decode, encode or both)"
            )),
        }
    }
}
