//! The PUB topic vLLM is configured with for llm-d: `kv@<pod-ip>:<port>@<model>`.
//!
//! llm-d splits the topic on every `@` and takes the pod from part 1 and the model from
//! part 2 only when there are exactly three parts; a model name holding `@` is therefore
//! unreadable to llm-d. [`Topic::parse`] splits the same way and says so with an error
//! instead of guessing, and [`Topic::new`] refuses to build a topic llm-d could not read.

use std::fmt;
use std::net::SocketAddr;

/// What every KV-event topic starts with; llm-d's default subscription filter.
pub const TOPIC_PREFIX: &str = "kv@";

/// A parsed `kv@<pod>@<model>` topic.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Topic {
    /// The pod part, `<ip>:<port>` of the pod's HTTP endpoint.
    pub pod: String,
    /// The served model name.
    pub model: String,
}

/// Why a topic cannot be built or read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// The topic does not split into exactly `kv`, pod and model on `@`.
    #[error("topic `{0}` is not kv@<pod>@<model>")]
    Malformed(String),
    /// A part is empty or holds `@`, which would make the topic unreadable.
    #[error("topic {part} `{value}` is empty or contains `@`")]
    BadPart {
        /// `pod` or `model`.
        part: &'static str,
        /// The offending value.
        value: String,
    },
}

impl Topic {
    /// A topic for `pod` and `model`; both must be non-empty and free of `@`.
    pub fn new(pod: impl Into<String>, model: impl Into<String>) -> Result<Topic, TopicError> {
        let (pod, model) = (pod.into(), model.into());
        for (part, value) in [("pod", &pod), ("model", &model)] {
            if value.is_empty() || value.contains('@') {
                return Err(TopicError::BadPart {
                    part,
                    value: value.clone(),
                });
            }
        }
        Ok(Topic { pod, model })
    }

    /// The topic of the pod serving HTTP on `addr`.
    pub fn for_pod(addr: SocketAddr, model: impl Into<String>) -> Result<Topic, TopicError> {
        Topic::new(addr.to_string(), model)
    }

    /// Reads a topic the way llm-d does: exactly three `@`-separated parts, the first `kv`.
    pub fn parse(s: &str) -> Result<Topic, TopicError> {
        let parts: Vec<&str> = s.split('@').collect();
        match parts.as_slice() {
            ["kv", pod, model] if !pod.is_empty() && !model.is_empty() => Ok(Topic {
                pod: (*pod).to_owned(),
                model: (*model).to_owned(),
            }),
            _ => Err(TopicError::Malformed(s.to_owned())),
        }
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{TOPIC_PREFIX}{}@{}", self.pod, self.model)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_parses_like_llm_d() {
        let t =
            Topic::for_pod("10.0.0.7:8000".parse().unwrap(), "meta-llama/Llama-3.1-8B").unwrap();
        assert_eq!(t.to_string(), "kv@10.0.0.7:8000@meta-llama/Llama-3.1-8B");
        assert_eq!(Topic::parse(&t.to_string()).unwrap(), t);
        let v6 = Topic::for_pod("[::1]:8000".parse().unwrap(), "m").unwrap();
        assert_eq!(Topic::parse(&v6.to_string()).unwrap().pod, "[::1]:8000");
    }

    #[test]
    fn rejects_what_llm_d_cannot_split() {
        for bad in [
            "kv@pod@org@model",
            "kv@pod",
            "xx@pod@m",
            "kv@@m",
            "kv@pod@",
            "",
        ] {
            assert!(Topic::parse(bad).is_err(), "{bad}");
        }
        assert!(matches!(
            Topic::new("1.2.3.4:80", "a@b"),
            Err(TopicError::BadPart { part: "model", .. })
        ));
        assert!(Topic::new("", "m").is_err());
    }
}
