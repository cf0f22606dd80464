//! `requestHandler.parsers` (llm-d v0.10) and the deprecated top-level `parser`: where the
//! list is read from, llm-d's defaults and registration rules, errors naming the field and
//! line, and what `config check` shows.

use infermesh_scheduler::config::{ConfigError, PluginSpec};
use infermesh_scheduler::{ApiKind, ParserType, ResolvedConfig, Scheduler, load_config};

const HEAD: &str = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n";

fn load(body: &str) -> ResolvedConfig {
    let cfg = load_config(&format!("{HEAD}{body}")).unwrap_or_else(|e| panic!("{e}"));
    Scheduler::new(&cfg).unwrap_or_else(|e| panic!("{e}"));
    cfg
}

fn err(body: &str) -> ConfigError {
    load_config(&format!("{HEAD}{body}")).unwrap_err()
}

#[test]
fn without_a_list_llm_d_default_parsers_run_and_nothing_is_refused() {
    let cfg = ResolvedConfig::builtin_default();
    assert_eq!(
        cfg.parsers,
        [
            "openai-parser",
            "anthropic-parser",
            "vllmhttp-parser",
            "passthrough-parser"
        ]
    );
    for name in &cfg.parsers {
        let p = cfg.plugin(name).unwrap();
        assert!(p.defaulted, "{name}");
        assert!(matches!(p.spec, PluginSpec::Parser(_)), "{name}");
    }
    let t = Scheduler::new(&cfg).unwrap().parsers().clone();
    assert_eq!(t.api_kind("/v1/messages"), Ok(ApiKind::AnthropicMessages));
    assert_eq!(
        t.api_kind("/inference/v1/generate"),
        Ok(ApiKind::VllmGenerate)
    );
    assert_eq!(t.api_kind("/tokenize"), Ok(ApiKind::Passthrough));
    assert!(cfg.warnings.is_empty(), "{:?}", cfg.warnings);
}

#[test]
fn the_new_location_decides_which_paths_are_served() {
    let path = format!(
        "{}/tests/fixtures/request-handler-parsers.yaml",
        env!("CARGO_MANIFEST_DIR")
    );
    let cfg = load_config(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(cfg.parsers, ["vllmhttp-parser", "chat", "everything-else"]);
    // No anthropic parser is listed, so none is added.
    assert!(cfg.plugin("anthropic-parser").is_none());
    let t = cfg.request_parsers();
    let (p, kind) = t.resolve("/v1/chat/completions").unwrap();
    assert_eq!((p.name.as_str(), kind), ("chat", ApiKind::ChatCompletions));
    let (p, kind) = t.resolve("/v1/messages").unwrap();
    assert_eq!(
        (p.name.as_str(), kind),
        ("everything-else", ApiKind::Passthrough)
    );
    assert_eq!(
        t.api_kind("/inference/v1/generate"),
        Ok(ApiKind::VllmGenerate)
    );
    let shown = cfg.to_string();
    for needle in [
        "requestHandler.parsers (the longest claimed path suffix wins):",
        "  vllmhttp-parser  claims inference/v1/generate",
        "  chat (openai-parser)  claims chat/completions, completions,",
        "  everything-else (passthrough-parser)  takes every path no other parser claims",
    ] {
        assert!(shown.contains(needle), "missing {needle:?} in:\n{shown}");
    }
}

#[test]
fn a_list_without_passthrough_refuses_unclaimed_paths() {
    let cfg = load("requestHandler:\n  parsers:\n  - pluginRef: openai-parser\n");
    assert_eq!(cfg.parsers, ["openai-parser"]);
    // A reference to an undeclared parser type adds that parser, as llm-d does.
    assert!(cfg.plugin("openai-parser").unwrap().defaulted);
    let t = cfg.request_parsers();
    assert_eq!(t.api_kind("/v1/completions"), Ok(ApiKind::Completions));
    let e = t.api_kind("/v1/messages").unwrap_err();
    assert_eq!(e.path, "/v1/messages");
    assert_eq!(e.parsers, ["openai-parser"]);
    assert!(
        cfg.to_string()
            .contains("a path no parser claims is refused with 400")
    );
}

#[test]
fn the_old_location_is_still_read_with_a_deprecation_warning() {
    let cfg = load("plugins:\n- name: p\n  type: anthropic-parser\nparser:\n  pluginRef: p\n");
    assert_eq!(cfg.parsers, ["p"]);
    assert_eq!(
        cfg.plugin("p").unwrap().spec,
        PluginSpec::Parser(ParserType::Anthropic)
    );
    assert!(
        cfg.warnings
            .iter()
            .any(|w| w.contains("`parser` is deprecated")),
        "{:?}",
        cfg.warnings
    );
    assert!(cfg.request_parsers().api_kind("/v1/completions").is_err());
}

#[test]
fn with_both_locations_the_new_one_wins() {
    let cfg = load(
        "parser:\n  pluginRef: openai-parser\nrequestHandler:\n  parsers:\n  - pluginRef: anthropic-parser\n  - pluginRef: passthrough-parser\n",
    );
    assert_eq!(cfg.parsers, ["anthropic-parser", "passthrough-parser"]);
    // The ignored top-level reference adds nothing.
    assert!(cfg.plugin("openai-parser").is_none());
    assert!(
        cfg.warnings
            .iter()
            .any(|w| w.contains("ignored") && w.contains("requestHandler.parsers")),
        "{:?}",
        cfg.warnings
    );
    // An empty list counts as absent, as in llm-d: the top-level parser is used.
    let cfg = load("parser:\n  pluginRef: openai-parser\nrequestHandler:\n  parsers: []\n");
    assert_eq!(cfg.parsers, ["openai-parser"]);
}

#[test]
fn skipped_parsers_are_warned_about_and_never_run() {
    let cfg = load(
        "plugins:\n- name: a\n  type: openai-parser\n- name: b\n  type: openai-parser\n\
         requestHandler:\n  parsers:\n  - pluginRef: a\n  - pluginRef: b\n  - pluginRef: passthrough-parser\n  - pluginRef: anthropic-parser\n",
    );
    assert_eq!(cfg.parsers, ["a", "passthrough-parser"]);
    assert_eq!(cfg.warnings.len(), 2, "{:?}", cfg.warnings);
    assert_eq!(
        cfg.request_parsers().api_kind("/v1/messages"),
        Ok(ApiKind::Passthrough)
    );
}

#[test]
fn a_dangling_reference_names_the_entry_and_line() {
    let e =
        err("requestHandler:\n  parsers:\n  - pluginRef: openai-parser\n  - pluginRef: ghost\n");
    assert_eq!(
        e.to_string(),
        "requestHandler.parsers[1].pluginRef: references undefined plugin `ghost` (at line 6, column 5)"
    );
    let e = err("parser:\n  pluginRef: ghost\n");
    assert_eq!(
        e.to_string(),
        "parser.pluginRef: references undefined plugin `ghost` (at line 3, column 1)"
    );
}

#[test]
fn a_reference_to_another_kind_of_plugin_is_refused() {
    let e = err(
        "plugins:\n- type: queue-scorer\nrequestHandler:\n  parsers:\n  - pluginRef: queue-scorer\n",
    );
    match &e {
        ConfigError::WrongKind {
            referrer,
            plugin,
            actual,
            expected,
            location,
            ..
        } => {
            assert_eq!(referrer, "requestHandler.parsers[0].pluginRef");
            assert_eq!(plugin, "queue-scorer");
            assert_eq!((*actual, *expected), ("scorer", "parser"));
            assert_eq!(location.unwrap().line, 7);
        }
        other => panic!("{other:?}"),
    }
    // Undeclared, but the name is a scorer type: llm-d builds it, then refuses it.
    let e = err("parser:\n  pluginRef: queue-scorer\n");
    assert!(
        matches!(&e, ConfigError::WrongKind { referrer, .. } if referrer == "parser.pluginRef"),
        "{e}"
    );
}

#[test]
fn parser_types_infermesh_does_not_run_are_refused_clearly() {
    let e = err("requestHandler:\n  parsers:\n  - pluginRef: vllmgrpc-parser\n");
    assert!(
        matches!(&e, ConfigError::UnsupportedPlugin { type_name, location: Some(l), .. }
            if type_name == "vllmgrpc-parser" && l.line == 5),
        "{e}"
    );
    let e = err("plugins:\n- type: sglanghttp-parser\n");
    assert!(matches!(&e, ConfigError::UnsupportedPlugin { .. }), "{e}");
    assert!(e.to_string().contains("passthrough-parser"), "{e}");
}

#[test]
fn the_section_is_strict() {
    let e = err("requestHandler:\n  parser:\n  - pluginRef: openai-parser\n");
    match &e {
        ConfigError::Yaml {
            message, location, ..
        } => {
            assert!(message.contains("unknown field `parser`"), "{message}");
            assert_eq!(location.unwrap().line, 4);
        }
        other => panic!("{other:?}"),
    }
    let e = err("requestHandler:\n  parsers:\n  - pluginRef: openai-parser\n    weight: 1\n");
    assert!(
        matches!(&e, ConfigError::Yaml { path, .. } if path.starts_with("requestHandler.parsers[0]")),
        "{e}"
    );
    let e = err("plugins:\n- type: openai-parser\n  parameters: {mode: fast}\n");
    assert!(
        matches!(&e, ConfigError::InvalidParameter { field, .. } if field == "mode"),
        "{e}"
    );
}
