//! Which request parser reads a request, by its path (llm-d's `requestHandler.parsers` and
//! its `ParserRegistry`, `pkg/epp/handlers/parsers.go` at v0.10).
//!
//! Each configured parser claims path suffixes. The longest claimed suffix that ends the
//! request path wins, whatever the order of the list; between equal suffixes the parser
//! listed first wins. A parser that claims no path (`passthrough-parser`) takes every path
//! the others leave, and llm-d stops registering at it, so parsers listed after it never
//! run; a second parser of a type already listed is skipped too. A path no parser takes is
//! refused with 400. Without a configured list llm-d runs openai, anthropic, vllmhttp and
//! passthrough, in that order, so nothing is refused.

use crate::openai::ApiKind;

/// A request parser plugin type infermesh runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ParserType {
    /// `openai-parser`
    OpenAi,
    /// `anthropic-parser`
    Anthropic,
    /// `vllmhttp-parser`: vLLM's `/inference/v1/generate`.
    VllmHttp,
    /// `passthrough-parser`: claims no path; takes what the others leave, unread.
    Passthrough,
}

/// llm-d's default parser list (`ensureParsers` in `pkg/epp/config/loader/defaults.go`).
pub const DEFAULT_PARSERS: [ParserType; 4] = [
    ParserType::OpenAi,
    ParserType::Anthropic,
    ParserType::VllmHttp,
    ParserType::Passthrough,
];

impl ParserType {
    /// Every parser type infermesh runs.
    pub const ALL: [ParserType; 4] = DEFAULT_PARSERS;

    /// The llm-d plugin type name.
    pub const fn type_name(self) -> &'static str {
        match self {
            ParserType::OpenAi => "openai-parser",
            ParserType::Anthropic => "anthropic-parser",
            ParserType::VllmHttp => "vllmhttp-parser",
            ParserType::Passthrough => "passthrough-parser",
        }
    }

    /// The parser type of an llm-d plugin type name.
    pub fn from_type_name(name: &str) -> Option<ParserType> {
        Self::ALL.into_iter().find(|p| p.type_name() == name)
    }

    /// The path suffixes it claims, as llm-d's `Claims().Paths` lists them; empty for the
    /// fallback.
    pub const fn claims(self) -> &'static [&'static str] {
        match self {
            ParserType::OpenAi => &[
                "chat/completions",
                "completions",
                "embeddings",
                "responses",
                "conversations",
                "chat/completions/render",
                "completions/render",
                "images/generations",
            ],
            ParserType::Anthropic => &["messages", "messages/count_tokens"],
            ParserType::VllmHttp => &["inference/v1/generate"],
            ParserType::Passthrough => &[],
        }
    }

    /// Whether it takes every path no other parser claims.
    pub const fn is_fallback(self) -> bool {
        self.claims().is_empty()
    }

    /// How infermesh reads the body of a request on `path` (already normalised) once this
    /// parser took it. Paths a parser claims whose bodies infermesh does not read (OpenAI
    /// conversations and image generation, Anthropic token counting) are routed by load
    /// alone, as a passthrough is: llm-d reads their model, infermesh does not.
    fn api_kind(self, path: &str) -> ApiKind {
        match self {
            ParserType::OpenAi => {
                // llm-d's `determineAPITypeFromPath` order.
                if path.ends_with("conversations") || path.ends_with("images/generations") {
                    ApiKind::Passthrough
                } else if path.ends_with("responses") {
                    ApiKind::Responses
                } else if path.ends_with("chat/completions")
                    || path.ends_with("chat/completions/render")
                {
                    ApiKind::ChatCompletions
                } else if path.ends_with("embeddings") {
                    ApiKind::Embeddings
                } else {
                    ApiKind::Completions
                }
            }
            ParserType::Anthropic if path.ends_with("messages/count_tokens") => {
                ApiKind::Passthrough
            }
            ParserType::Anthropic => ApiKind::AnthropicMessages,
            ParserType::VllmHttp => ApiKind::VllmGenerate,
            ParserType::Passthrough => ApiKind::Passthrough,
        }
    }
}

/// A request path that no configured parser takes (HTTP 400; nothing was scheduled).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "no parser registered matching path suffix for: {path} (configured parsers: {})",
    .parsers.join(", ")
)]
pub struct NoParser {
    /// The request path, query removed.
    pub path: String,
    /// The configured parser plugin names, in resolution order.
    pub parsers: Vec<String>,
}

/// One configured parser.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfiguredParser {
    /// The plugin name.
    pub name: String,
    /// Its type.
    pub parser: ParserType,
}

/// The parsers in force, in configured order, after llm-d's registration rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestParsers {
    /// Parsers that claim paths.
    claiming: Vec<ConfiguredParser>,
    /// The parser that takes every unclaimed path, when one is configured.
    fallback: Option<ConfiguredParser>,
}

impl Default for RequestParsers {
    /// llm-d's default list, each parser named after its type.
    fn default() -> Self {
        RequestParsers::new(DEFAULT_PARSERS.map(|p| ConfiguredParser {
            name: p.type_name().to_owned(),
            parser: p,
        }))
        .0
    }
}

impl RequestParsers {
    /// Registers `parsers` in order as llm-d does: a parser whose type is already
    /// registered is skipped, and registration stops at the first parser claiming no
    /// paths. Returns the table and a warning for each parser skipped.
    pub fn new(parsers: impl IntoIterator<Item = ConfiguredParser>) -> (Self, Vec<String>) {
        let mut table = RequestParsers {
            claiming: Vec::new(),
            fallback: None,
        };
        let mut warnings = Vec::new();
        let mut seen: Vec<ParserType> = Vec::new();
        for p in parsers {
            if let Some(f) = &table.fallback {
                warnings.push(format!(
                    "parser `{}` is skipped: it is listed after `{}`, which takes every unclaimed path",
                    p.name, f.name
                ));
                continue;
            }
            if seen.contains(&p.parser) {
                warnings.push(format!(
                    "parser `{}` is skipped: a parser of type `{}` is already listed",
                    p.name,
                    p.parser.type_name()
                ));
                continue;
            }
            seen.push(p.parser);
            if p.parser.is_fallback() {
                table.fallback = Some(p);
            } else {
                table.claiming.push(p);
            }
        }
        (table, warnings)
    }

    /// The parsers in force, in resolution order (the fallback last).
    pub fn parsers(&self) -> impl Iterator<Item = &ConfiguredParser> {
        self.claiming.iter().chain(self.fallback.as_ref())
    }

    /// Whether a path no parser claims is routed unread instead of refused.
    pub fn has_fallback(&self) -> bool {
        self.fallback.is_some()
    }

    /// The parser for `path` (query string ignored) and how it reads the body.
    pub fn resolve(&self, path: &str) -> Result<(&ConfiguredParser, ApiKind), NoParser> {
        // llm-d: the query goes, then surrounding space and one trailing slash.
        let path = path.split_once('?').map_or(path, |(p, _)| p).trim();
        let path = path.strip_suffix('/').unwrap_or(path);
        let mut best: Option<(&ConfiguredParser, usize)> = None;
        for p in &self.claiming {
            for suffix in p.parser.claims() {
                // Strictly longer: between equal suffixes the parser listed first stays.
                if path.ends_with(suffix) && best.is_none_or(|(_, len)| suffix.len() > len) {
                    best = Some((p, suffix.len()));
                }
            }
        }
        match best.map(|(p, _)| p).or(self.fallback.as_ref()) {
            Some(p) => Ok((p, p.parser.api_kind(path))),
            None => Err(NoParser {
                path: path.to_owned(),
                parsers: self.parsers().map(|p| p.name.clone()).collect(),
            }),
        }
    }

    /// How the body of a request on `path` is read, or why no parser takes it.
    pub fn api_kind(&self, path: &str) -> Result<ApiKind, NoParser> {
        self.resolve(path).map(|(_, kind)| kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(list: &[(&str, ParserType)]) -> (RequestParsers, Vec<String>) {
        RequestParsers::new(list.iter().map(|(n, p)| ConfiguredParser {
            name: (*n).to_owned(),
            parser: *p,
        }))
    }

    #[test]
    fn the_default_list_reads_every_known_path_and_passes_the_rest() {
        let t = RequestParsers::default();
        for (path, kind) in [
            ("/v1/chat/completions", ApiKind::ChatCompletions),
            ("/v1/completions?x=1", ApiKind::Completions),
            ("/v1/embeddings", ApiKind::Embeddings),
            ("/v1/responses/", ApiKind::Responses),
            ("/v1/messages", ApiKind::AnthropicMessages),
            ("/v1/messages/count_tokens", ApiKind::Passthrough),
            ("/inference/v1/generate", ApiKind::VllmGenerate),
            ("/v1/chat/completions/render", ApiKind::ChatCompletions),
            ("/v1/completions/render", ApiKind::Completions),
            ("/v1/conversations", ApiKind::Passthrough),
            ("/v1/images/generations", ApiKind::Passthrough),
            ("/v1/audio/transcriptions", ApiKind::Passthrough),
            ("/tokenize", ApiKind::Passthrough),
            ("/", ApiKind::Passthrough),
        ] {
            assert_eq!(t.api_kind(path), Ok(kind), "{path}");
        }
        let (p, _) = t.resolve("/tokenize").unwrap();
        assert_eq!(p.name, "passthrough-parser");
        let (p, _) = t.resolve("/v1/chat/completions").unwrap();
        assert_eq!(p.name, "openai-parser");
    }

    #[test]
    fn an_unclaimed_path_without_a_fallback_is_refused_naming_path_and_parsers() {
        let (t, w) = table(&[("mine", ParserType::OpenAi)]);
        assert!(w.is_empty());
        assert!(!t.has_fallback());
        assert_eq!(t.api_kind("/v1/completions"), Ok(ApiKind::Completions));
        let e = t.api_kind("/v1/messages?beta=true").unwrap_err();
        assert_eq!(
            e,
            NoParser {
                path: "/v1/messages".into(),
                parsers: vec!["mine".into()],
            }
        );
        assert_eq!(
            e.to_string(),
            "no parser registered matching path suffix for: /v1/messages (configured parsers: mine)"
        );
        assert!(t.api_kind("/inference/v1/generate").is_err());
    }

    #[test]
    fn the_longest_claimed_suffix_wins_whatever_the_order() {
        // `completions` also ends `/v1/chat/completions`; the longer claim wins.
        let (t, _) = table(&[
            ("vllm", ParserType::VllmHttp),
            ("openai", ParserType::OpenAi),
            ("anthropic", ParserType::Anthropic),
        ]);
        assert_eq!(
            t.api_kind("/v1/chat/completions"),
            Ok(ApiKind::ChatCompletions)
        );
        assert_eq!(
            t.api_kind("/v1/messages/count_tokens"),
            Ok(ApiKind::Passthrough)
        );
        assert_eq!(t.resolve("/v1/messages").unwrap().0.name, "anthropic");
    }

    #[test]
    fn duplicates_and_parsers_after_the_fallback_are_skipped_with_a_warning() {
        let (t, w) = table(&[
            ("first", ParserType::OpenAi),
            ("second", ParserType::OpenAi),
            ("rest", ParserType::Passthrough),
            ("late", ParserType::Anthropic),
        ]);
        let names: Vec<&str> = t.parsers().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["first", "rest"]);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].contains("`second`") && w[0].contains("openai-parser"));
        assert!(w[1].contains("`late`") && w[1].contains("`rest`"));
        // The anthropic parser listed after the fallback never runs.
        assert_eq!(t.resolve("/v1/messages").unwrap().0.name, "rest");
        assert_eq!(t.resolve("/v1/completions").unwrap().0.name, "first");
    }

    #[test]
    fn type_names_round_trip() {
        for p in ParserType::ALL {
            assert_eq!(ParserType::from_type_name(p.type_name()), Some(p));
        }
        assert_eq!(ParserType::from_type_name("vllmgrpc-parser"), None);
    }
}
