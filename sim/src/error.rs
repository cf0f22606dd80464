//! Errors of the simulator library.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Why a fleet could not be configured or started; nothing is left running when returned.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The profile name is not one of the built-in profiles.
    #[error("unknown engine profile `{name}` (known: {known})")]
    UnknownProfile {
        /// The name asked for.
        name: String,
        /// The names that exist.
        known: String,
    },
    /// A profile constant is out of range.
    #[error("invalid engine profile: `{field}` {reason}")]
    InvalidProfile {
        /// The offending field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A fleet setting is out of range.
    #[error("invalid fleet config: `{field}` {reason}")]
    InvalidConfig {
        /// The offending field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The pod index does not exist or the pod was stopped; nothing changed.
    #[error("no running pod {index}")]
    NoSuchPod {
        /// The index asked for.
        index: usize,
    },
    /// A pod's KV-event publisher could not start (port taken, bad endpoint); pods already
    /// started were stopped.
    #[error("pod {pod}: KV-event publisher: {source}")]
    KvEvents {
        /// Index of the pod.
        pod: usize,
        /// The publisher's error.
        source: infermesh_kvevents::PublisherError,
    },
    /// The `tokenizer.json` file cannot be used as the pods' tokenizer.
    #[error("tokenizer file {}: {reason}", path.display())]
    Tokenizer {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: TokenizerError,
    },
    /// A pod's listener could not be bound; pods already started were stopped.
    #[error("cannot bind pod {pod} to {addr}: {source}")]
    Bind {
        /// Index of the pod.
        pod: usize,
        /// Address it tried.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Why a `tokenizer.json` cannot serve as a pod's tokenizer (the message holds the cause).
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// The file cannot be read.
    #[error("cannot read it: {0}")]
    Read(std::io::Error),
    /// The document is not a valid `tokenizer.json`.
    #[error("not a valid tokenizer.json: {0}")]
    Parse(tokenizers::Error),
    /// A filler word of the generated text cannot be encoded.
    #[error("cannot encode the filler word {word:?}: {error}")]
    Filler {
        /// The word.
        word: &'static str,
        /// The tokenizer's error.
        error: tokenizers::Error,
    },
    /// A filler word of the generated text encodes to no token.
    #[error("the filler word {word:?} encodes to no token")]
    EmptyFiller {
        /// The word.
        word: &'static str,
    },
}

/// A text the pod's tokenizer cannot encode.
#[derive(Debug, thiserror::Error)]
#[error("the tokenizer cannot encode the text: {0}")]
pub struct TokenizeError(pub tokenizers::Error);
