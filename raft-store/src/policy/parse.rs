//! Parsing and validation of multi-document policy YAML (kubectl apply style).
//!
//! Every document is parsed and validated before anything is written; an error names the
//! document (1-based, in file order), its kind and name, and the field at fault.

use std::collections::{BTreeSet, HashSet};

use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::object::{
    AppProtocol, Document, EndpointPickerConfigDoc, InferenceEndpointsSpec,
    InferenceModelRewriteSpec, InferenceObjectiveSpec, InferencePoolSpec, Kind, ObjectKey,
    ObjectMeta, PolicyObject, PoolRef,
};

/// Largest rewrite target weight accepted (GIE: 1..=1e6).
pub const MAX_REWRITE_WEIGHT: i64 = 1_000_000;
/// Most target ports an InferencePool may list (GIE: 1..=8).
pub const MAX_TARGET_PORTS: usize = 8;

/// A document that failed to parse or validate; nothing was applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("document {document} ({kind} {name:?}): field `{field}`: {reason}")]
pub struct InvalidDocument {
    /// 1-based position of the document in the input.
    pub document: usize,
    /// The document's kind as written (empty when absent).
    pub kind: String,
    /// The document's name as written (empty when absent).
    pub name: String,
    /// Path of the offending field (e.g. `spec.targetPorts[2].number`).
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

/// Checks an EndpointPickerConfig (given as YAML text, without `metadata`) before it is
/// committed; the node passes the scheduler's loader so this crate stays free of the scheduler.
pub type EppConfigValidator = std::sync::Arc<
    dyn Fn(&str) -> Result<(), Box<dyn std::error::Error + Send + Sync>> + Send + Sync,
>;

/// An EppConfigValidator that accepts every config (for tests and tools without a scheduler).
pub fn accept_any_epp_config() -> EppConfigValidator {
    std::sync::Arc::new(|_| Ok(()))
}

struct DocCtx {
    document: usize,
    kind: String,
    name: String,
}

impl DocCtx {
    fn err(&self, field: impl Into<String>, reason: impl Into<String>) -> InvalidDocument {
        InvalidDocument {
            document: self.document,
            kind: self.kind.clone(),
            name: self.name.clone(),
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Parses multi-document YAML (or JSON) into typed objects, validating each one and the
/// batch as a whole (no key twice). Empty documents are skipped.
pub fn parse_documents(
    text: &str,
    epp_validator: &EppConfigValidator,
) -> Result<Vec<PolicyObject>, InvalidDocument> {
    parse_document_values(read_documents(text)?, epp_validator)
}

/// Reads multi-document YAML (or JSON) into one value per non-empty document, each with its
/// 1-based position in the text (empty documents keep their number, so errors point at
/// the document as the reader counts them).
pub fn read_documents(text: &str) -> Result<Vec<(usize, serde_json::Value)>, InvalidDocument> {
    let mut out = Vec::new();
    for (i, de) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let ctx = DocCtx {
            document: i + 1,
            kind: String::new(),
            name: String::new(),
        };
        let value = serde_json::Value::deserialize(de)
            .map_err(|e| ctx.err("", format!("not a valid YAML document: {e}")))?;
        if !value.is_null() {
            out.push((i + 1, value));
        }
    }
    Ok(out)
}

/// The second half of [`parse_documents`], for callers that read the documents themselves
/// (the node's endpoints file takes its own extension fields out first): parses and
/// validates each `(position, value)` and the batch as a whole (no key twice).
pub fn parse_document_values(
    documents: Vec<(usize, serde_json::Value)>,
    epp_validator: &EppConfigValidator,
) -> Result<Vec<PolicyObject>, InvalidDocument> {
    let mut out = Vec::new();
    let mut seen: HashSet<ObjectKey> = HashSet::new();
    for (document, value) in documents {
        let object = parse_value(document, value)?;
        validate_object(document, &object, epp_validator)?;
        let key = object.key();
        if !seen.insert(key.clone()) {
            return Err(DocCtx {
                document,
                kind: key.kind.to_string(),
                name: key.name.clone(),
            }
            .err(
                "metadata.name",
                format!("{key} appears more than once in this apply"),
            ));
        }
        out.push(object);
    }
    Ok(out)
}

/// Parses one document given as a JSON value (document numbering is the caller's).
pub fn parse_value(
    document: usize,
    value: serde_json::Value,
) -> Result<PolicyObject, InvalidDocument> {
    let mut ctx = DocCtx {
        document,
        kind: String::new(),
        name: String::new(),
    };
    let serde_json::Value::Object(mut map) = value else {
        return Err(ctx.err("", "a document must be a mapping"));
    };
    let kind_str = match map.get("kind") {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(_) => return Err(ctx.err("kind", "must be a string")),
        None => return Err(ctx.err("kind", "is required")),
    };
    ctx.kind = kind_str.clone();
    if let Some(serde_json::Value::String(n)) = map.get("metadata").and_then(|m| m.get("name")) {
        ctx.name = n.clone();
    }
    let kind = Kind::ALL
        .into_iter()
        .find(|k| k.as_str() == kind_str)
        .ok_or_else(|| {
            let known: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
            ctx.err(
                "kind",
                format!("unknown kind {kind_str:?}; known: {}", known.join(", ")),
            )
        })?;
    match map.get("apiVersion") {
        Some(serde_json::Value::String(v)) if kind.api_versions().contains(&v.as_str()) => {}
        Some(serde_json::Value::String(v)) => {
            return Err(ctx.err(
                "apiVersion",
                format!(
                    "{v:?} is not valid for {kind}; expected {}",
                    kind.api_versions().join(" or ")
                ),
            ));
        }
        Some(_) => return Err(ctx.err("apiVersion", "must be a string")),
        None => return Err(ctx.err("apiVersion", "is required")),
    }
    let value = serde_json::Value::Object(map.clone());
    Ok(match kind {
        Kind::InferencePool => PolicyObject::InferencePool(typed(&ctx, value)?),
        Kind::InferenceObjective => PolicyObject::InferenceObjective(typed(&ctx, value)?),
        Kind::InferenceModelRewrite => PolicyObject::InferenceModelRewrite(typed(&ctx, value)?),
        Kind::InferenceEndpoints => PolicyObject::InferenceEndpoints(typed(&ctx, value)?),
        Kind::InfermeshNode => PolicyObject::InfermeshNode(typed(&ctx, value)?),
        Kind::EndpointPickerConfig => {
            // Upstream EndpointPickerConfig files carry no metadata; one such config per
            // namespace is then named `default`.
            let metadata = match map.remove("metadata") {
                Some(m) => {
                    let de = serde_path_to_error::deserialize::<_, ObjectMeta>(m);
                    de.map_err(|e| {
                        ctx.err(format!("metadata.{}", e.path()), e.inner().to_string())
                    })?
                }
                None => ObjectMeta {
                    name: "default".into(),
                    namespace: super::object::DEFAULT_NAMESPACE.into(),
                    labels: Default::default(),
                    annotations: Default::default(),
                    resource_version: None,
                },
            };
            PolicyObject::EndpointPickerConfig(EndpointPickerConfigDoc {
                metadata,
                config: serde_json::Value::Object(map),
            })
        }
    })
}

fn typed<S: DeserializeOwned>(
    ctx: &DocCtx,
    value: serde_json::Value,
) -> Result<Document<S>, InvalidDocument> {
    serde_path_to_error::deserialize::<_, Document<S>>(value)
        .map_err(|e| ctx.err(e.path().to_string(), e.inner().to_string()))
}

/// Validates one parsed object (semantic rules beyond the schema).
pub fn validate_object(
    document: usize,
    object: &PolicyObject,
    epp_validator: &EppConfigValidator,
) -> Result<(), InvalidDocument> {
    let meta = object.metadata();
    let ctx = DocCtx {
        document,
        kind: object.kind().to_string(),
        name: meta.name.clone(),
    };
    validate_name(&ctx, "metadata.name", &meta.name, 253)?;
    validate_name(&ctx, "metadata.namespace", &meta.namespace, 63)?;
    if let Some(rv) = &meta.resource_version {
        rv.parse::<u64>().map_err(|_| {
            ctx.err(
                "metadata.resourceVersion",
                format!("{rv:?} is not a resource version (a log index)"),
            )
        })?;
    }
    match object {
        PolicyObject::InferencePool(d) => validate_pool(&ctx, &d.spec),
        PolicyObject::InferenceObjective(d) => validate_objective(&ctx, &d.spec),
        PolicyObject::InferenceModelRewrite(d) => validate_rewrite(&ctx, &d.spec),
        PolicyObject::InferenceEndpoints(d) => validate_endpoints(&ctx, &d.spec),
        PolicyObject::InfermeshNode(_) => Ok(()),
        PolicyObject::EndpointPickerConfig(d) => {
            if !d
                .config
                .get("kind")
                .is_some_and(|k| k == "EndpointPickerConfig")
            {
                return Err(ctx.err("kind", "must be EndpointPickerConfig"));
            }
            epp_validator(&d.config_text()).map_err(|e| {
                ctx.err(
                    "",
                    format!("rejected by the scheduler's config loader: {e}"),
                )
            })
        }
    }
}

fn validate_name(ctx: &DocCtx, field: &str, name: &str, max: usize) -> Result<(), InvalidDocument> {
    if name.is_empty() {
        return Err(ctx.err(field, "must not be empty"));
    }
    if name.len() > max {
        return Err(ctx.err(field, format!("longer than {max} characters")));
    }
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
    let edge_ok = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if !name.chars().all(ok_char) || !edge_ok(name.chars().next()) || !edge_ok(name.chars().last())
    {
        return Err(ctx.err(
            field,
            format!("{name:?} must be lowercase letters, digits, '-' or '.', starting and ending with a letter or digit"),
        ));
    }
    Ok(())
}

fn validate_pool_ref(ctx: &DocCtx, field: &str, r: &PoolRef) -> Result<(), InvalidDocument> {
    if r.kind != "InferencePool" {
        return Err(ctx.err(
            format!("{field}.kind"),
            format!("{:?} is not InferencePool", r.kind),
        ));
    }
    if r.group != "inference.networking.k8s.io" && r.group != "inference.networking.x-k8s.io" {
        return Err(ctx.err(
            format!("{field}.group"),
            format!("{:?} is not an inference API group", r.group),
        ));
    }
    validate_name(ctx, &format!("{field}.name"), &r.name, 253)
}

/// Why a `targetPorts` list was refused: GIE allows 1 to [`MAX_TARGET_PORTS`] unique ports.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidTargetPorts {
    /// Empty, or more than [`MAX_TARGET_PORTS`] entries.
    #[error("must list 1 to {max} ports, got {0}", max = MAX_TARGET_PORTS)]
    Count(usize),
    /// An entry outside 1-65535.
    #[error("{number} is not a port (1-65535)")]
    OutOfRange {
        /// Position in the list.
        index: usize,
        /// The number given.
        number: i64,
    },
    /// An entry repeating an earlier one.
    #[error("port {number} is listed twice")]
    Duplicate {
        /// Position of the repeat in the list.
        index: usize,
        /// The repeated port.
        number: i64,
    },
}

impl InvalidTargetPorts {
    /// The offending field under the list's own path `at` (`at[2].number`, or `at` itself).
    pub fn field(&self, at: &str) -> String {
        match self {
            InvalidTargetPorts::Count(_) => at.to_owned(),
            InvalidTargetPorts::OutOfRange { index, .. }
            | InvalidTargetPorts::Duplicate { index, .. } => format!("{at}[{index}].number"),
        }
    }
}

/// Checks a `targetPorts` list (an InferencePool's, an endpoints file pod's, an xDS pool's):
/// one rule for every source, so they accept and refuse the same lists.
pub fn validate_target_ports(
    ports: impl IntoIterator<Item = i64>,
) -> Result<(), InvalidTargetPorts> {
    let ports: Vec<i64> = ports.into_iter().collect();
    if ports.is_empty() || ports.len() > MAX_TARGET_PORTS {
        return Err(InvalidTargetPorts::Count(ports.len()));
    }
    let mut seen = BTreeSet::new();
    for (index, &number) in ports.iter().enumerate() {
        if !(1..=65535).contains(&number) {
            return Err(InvalidTargetPorts::OutOfRange { index, number });
        }
        if !seen.insert(number) {
            return Err(InvalidTargetPorts::Duplicate { index, number });
        }
    }
    Ok(())
}

fn validate_pool(ctx: &DocCtx, spec: &InferencePoolSpec) -> Result<(), InvalidDocument> {
    if spec.selector.match_labels.is_empty() {
        return Err(ctx.err("spec.selector.matchLabels", "must name at least one label"));
    }
    let ports = spec.target_ports.iter().map(|p| p.number);
    validate_target_ports(ports)
        .map_err(|e| ctx.err(e.field("spec.targetPorts"), e.to_string()))?;
    if spec.app_protocol == AppProtocol::H2c {
        // Envoy could speak HTTP/2 to the pods, but the node's own proxy (and the pool it
        // serves from an endpoints file) speaks HTTP/1.1 only: accepting h2c would route
        // requests the pods cannot read.
        return Err(ctx.err(
            "spec.appProtocol",
            "\"kubernetes.io/h2c\" is not supported: infermesh's proxy speaks HTTP/1.1 to model servers; use \"http\"",
        ));
    }
    if let Some(r) = &spec.endpoint_picker_ref {
        if r.name.is_empty() {
            return Err(ctx.err("spec.endpointPickerRef.name", "must not be empty"));
        }
        match r.port {
            None if r.kind == "Service" => {
                return Err(ctx.err(
                    "spec.endpointPickerRef.port",
                    "is required when kind is Service",
                ));
            }
            Some(p) if !(1..=65535).contains(&p.number) => {
                return Err(ctx.err(
                    "spec.endpointPickerRef.port.number",
                    format!("{} is not a port (1-65535)", p.number),
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

fn validate_objective(ctx: &DocCtx, spec: &InferenceObjectiveSpec) -> Result<(), InvalidDocument> {
    validate_pool_ref(ctx, "spec.poolRef", &spec.pool_ref)
}

fn validate_rewrite(ctx: &DocCtx, spec: &InferenceModelRewriteSpec) -> Result<(), InvalidDocument> {
    validate_pool_ref(ctx, "spec.poolRef", &spec.pool_ref)?;
    if spec.rules.is_empty() {
        return Err(ctx.err("spec.rules", "must have at least one rule"));
    }
    for (ri, rule) in spec.rules.iter().enumerate() {
        for (mi, m) in rule.matches.iter().enumerate() {
            if m.model.value.is_empty() {
                return Err(ctx.err(
                    format!("spec.rules[{ri}].matches[{mi}].model.value"),
                    "must not be empty",
                ));
            }
        }
        if rule.targets.is_empty() {
            return Err(ctx.err(
                format!("spec.rules[{ri}].targets"),
                "must have at least one target",
            ));
        }
        let weighted = rule.targets.iter().filter(|t| t.weight.is_some()).count();
        for (ti, t) in rule.targets.iter().enumerate() {
            let field = format!("spec.rules[{ri}].targets[{ti}]");
            if t.model_rewrite.is_empty() {
                return Err(ctx.err(format!("{field}.modelRewrite"), "must not be empty"));
            }
            match t.weight {
                Some(w) if !(1..=MAX_REWRITE_WEIGHT).contains(&w) => {
                    return Err(ctx.err(
                        format!("{field}.weight"),
                        format!("{w} is outside 1..={MAX_REWRITE_WEIGHT}"),
                    ));
                }
                None if weighted > 0 => {
                    return Err(ctx.err(
                        format!("{field}.weight"),
                        "if one target has a weight, all targets must",
                    ));
                }
                _ => {}
            }
        }
    }
    Ok(())
}

fn validate_endpoints(ctx: &DocCtx, spec: &InferenceEndpointsSpec) -> Result<(), InvalidDocument> {
    if let Some(r) = &spec.pool_ref {
        validate_pool_ref(ctx, "spec.poolRef", r)?;
    }
    let mut seen = HashSet::new();
    for (i, e) in spec.endpoints.iter().enumerate() {
        if e.address.port() == 0 {
            return Err(ctx.err(format!("spec.endpoints[{i}].address"), "port must not be 0"));
        }
        if !seen.insert(e.address) {
            return Err(ctx.err(
                format!("spec.endpoints[{i}].address"),
                format!("{} is listed twice", e.address),
            ));
        }
        if e.labels.keys().any(|k| k.is_empty()) {
            return Err(ctx.err(
                format!("spec.endpoints[{i}].labels"),
                "label keys must not be empty",
            ));
        }
    }
    Ok(())
}
