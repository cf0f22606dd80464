//! Configuration errors: each names the plugin, field and (when known) the YAML location.

use std::fmt;

/// A 1-based position in the YAML text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// Line, from 1.
    pub line: usize,
    /// Column, from 1.
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}, column {}", self.line, self.column)
    }
}

/// Why a configuration was rejected. Nothing was applied.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// The YAML does not parse or does not have the EndpointPickerConfig shape.
    #[error("invalid YAML{}: {message}{}", at_path(path), at(location))]
    Yaml {
        /// Path of the offending key (e.g. `schedulingProfiles[0].plugins[1].weight`).
        path: String,
        /// What is wrong.
        message: String,
        /// Where, when the parser knows.
        location: Option<Location>,
    },
    /// A top-level field has a wrong value.
    #[error("field `{field}`: {message}{}", at(location))]
    Field {
        /// The field.
        field: String,
        /// What is wrong.
        message: String,
        /// Where.
        location: Option<Location>,
    },
    /// No plugin type of this name exists.
    #[error("plugin `{plugin}`: unknown plugin type `{type_name}`{}", at(location))]
    UnknownPluginType {
        /// Plugin name.
        plugin: String,
        /// The unknown type.
        type_name: String,
        /// Where.
        location: Option<Location>,
    },
    /// A real llm-d plugin type that infermesh does not implement.
    #[error(
        "plugin `{plugin}`: type `{type_name}` is not supported by infermesh: {reason}{}",
        at(location)
    )]
    UnsupportedPlugin {
        /// Plugin name.
        plugin: String,
        /// Its type.
        type_name: String,
        /// Why, and what to use instead.
        reason: String,
        /// Where.
        location: Option<Location>,
    },
    /// A parameter is unknown, ill-typed or out of range.
    #[error(
        "plugin `{plugin}` (type `{type_name}`): parameter `{field}`: {message}{}",
        at(location)
    )]
    InvalidParameter {
        /// Plugin name.
        plugin: String,
        /// Its type.
        type_name: String,
        /// The parameter's path inside `parameters`.
        field: String,
        /// What is wrong.
        message: String,
        /// Where.
        location: Option<Location>,
    },
    /// Two plugins share a name.
    #[error("plugin name `{plugin}` is defined twice{}", at(location))]
    DuplicatePlugin {
        /// The name.
        plugin: String,
        /// Where the second one is.
        location: Option<Location>,
    },
    /// A reference names no defined plugin.
    #[error(
        "{referrer}: references undefined plugin `{plugin_ref}`{}",
        at(location)
    )]
    DanglingRef {
        /// What refers (e.g. `schedulingProfiles[decode].plugins[2].pluginRef`).
        referrer: String,
        /// The missing name.
        plugin_ref: String,
        /// Where.
        location: Option<Location>,
    },
    /// A reference names a plugin of the wrong kind.
    #[error(
        "{referrer}: plugin `{plugin}` (type `{type_name}`) is a {actual}, expected {expected}{}",
        at(location)
    )]
    WrongKind {
        /// What refers.
        referrer: String,
        /// The plugin.
        plugin: String,
        /// Its type.
        type_name: String,
        /// What it is.
        actual: &'static str,
        /// What was needed.
        expected: &'static str,
        /// Where.
        location: Option<Location>,
    },
    /// A plugin llm-d registers at Alpha stability, without `--allow-experimental-plugins`.
    #[error(
        "plugin `{plugin}` (type `{type_name}`) is an Alpha (experimental) plugin in llm-d; start with --allow-experimental-plugins to use it"
    )]
    ExperimentalPlugin {
        /// Plugin name.
        plugin: String,
        /// Its type.
        type_name: String,
    },
    /// A scheduling profile is inconsistent.
    #[error("scheduling profile `{profile}`: {message}{}", at(location))]
    Profile {
        /// Profile name (or `schedulingProfiles[i]`).
        profile: String,
        /// What is wrong.
        message: String,
        /// Where.
        location: Option<Location>,
    },
}

fn at(l: &Option<Location>) -> String {
    l.map(|l| format!(" (at {l})")).unwrap_or_default()
}

fn at_path(p: &str) -> String {
    if p.is_empty() || p == "." {
        String::new()
    } else {
        format!(" at `{p}`")
    }
}

impl ConfigError {
    /// The YAML location, when known.
    pub fn location(&self) -> Option<Location> {
        match self {
            ConfigError::Yaml { location, .. }
            | ConfigError::Field { location, .. }
            | ConfigError::UnknownPluginType { location, .. }
            | ConfigError::UnsupportedPlugin { location, .. }
            | ConfigError::InvalidParameter { location, .. }
            | ConfigError::DuplicatePlugin { location, .. }
            | ConfigError::DanglingRef { location, .. }
            | ConfigError::WrongKind { location, .. }
            | ConfigError::Profile { location, .. } => *location,
            ConfigError::ExperimentalPlugin { .. } => None,
        }
    }
}
