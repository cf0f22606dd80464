//! llm-d's `file-discovery` endpoints file (`dataLayer.discovery.pluginRef` naming a
//! `file-discovery` plugin): the pool's endpoints without Kubernetes, in llm-d's format.
//!
//! ```yaml
//! endpoints:
//!   - name: vllm-0              # the pod name (namespace defaults to "default")
//!     address: "10.0.0.1"       # an IPv4 address
//!     port: "8000"              # 1-65535, a string as llm-d writes it (a number is read too)
//!     labels: {llm-d.ai/role: decode}
//! ```
//!
//! As in llm-d: the file is at most 1 MiB; an unreadable or unparsable file is an error; an
//! invalid entry fails the first load (naming it) and is skipped, with a log, on a reload,
//! where the valid entries apply; endpoints missing from a reload are removed. With
//! `watchFile` the file is re-read when it changes.

use std::collections::BTreeMap;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::pool_model::{EndpointSpec, Engine, PoolSpec};

/// llm-d's cap on the endpoints file.
pub const MAX_FILE_BYTES: u64 = 1 << 20;

/// Why an endpoints file was refused (at startup nothing starts; on a reload the previous
/// endpoints stay).
#[derive(Debug, thiserror::Error)]
pub enum InvalidEndpointsFile {
    /// The file could not be read.
    #[error("cannot read endpoints file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The IO error.
        source: std::io::Error,
    },
    /// Larger than llm-d's 1 MiB limit.
    #[error("endpoints file {path} exceeds the 1 MiB limit")]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// Not YAML/JSON of the expected shape.
    #[error("endpoints file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, with the field path.
        message: String,
    },
    /// Invalid entries (fatal on the first load only).
    #[error("endpoints file {path}: {}", .errors.join("; "))]
    Entries {
        /// The file.
        path: PathBuf,
        /// One message per invalid entry, naming it.
        errors: Vec<String>,
    },
}

#[derive(Deserialize)]
struct FileDoc {
    #[serde(default)]
    endpoints: Vec<Entry>,
}

#[derive(Deserialize)]
struct Entry {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    address: String,
    #[serde(default)]
    port: Option<serde_json::Value>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

/// Parses an endpoints file's text into the pool `pool` (named after the plugin), with one
/// message per skipped entry.
pub fn parse_endpoints(
    path: &Path,
    text: &str,
    pool: &str,
) -> Result<(PoolSpec, Vec<String>), InvalidEndpointsFile> {
    let doc: FileDoc = if text.trim().is_empty() {
        FileDoc {
            endpoints: Vec::new(),
        }
    } else {
        let de = serde_yaml_ng::Deserializer::from_str(text);
        serde_path_to_error::deserialize(de).map_err(|e| InvalidEndpointsFile::Parse {
            path: path.to_owned(),
            message: format!("{}: {}", e.path(), e.inner()),
        })?
    };
    let mut errors = Vec::new();
    // Keyed by namespace/name: a later entry with the same id replaces the earlier one.
    let mut by_id: BTreeMap<String, (usize, EndpointSpec)> = BTreeMap::new();
    for (i, e) in doc.endpoints.into_iter().enumerate() {
        let what = format!("endpoint {:?} (endpoints[{i}])", e.name);
        let Ok(ip) = e.address.parse::<Ipv4Addr>() else {
            errors.push(format!("{what}: invalid IPv4 address {:?}", e.address));
            continue;
        };
        let port = match &e.port {
            Some(serde_json::Value::String(s)) => s.trim().parse::<u16>().ok(),
            Some(serde_json::Value::Number(n)) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
            _ => None,
        };
        let Some(port) = port.filter(|&p| p >= 1) else {
            let shown = e.port.map(|p| p.to_string()).unwrap_or_default();
            errors.push(format!("{what}: invalid port {shown}"));
            continue;
        };
        let engine = match Engine::from_labels(&e.labels) {
            Ok(x) => x,
            Err(err) => {
                errors.push(format!("{what}: {err}"));
                continue;
            }
        };
        let ns = if e.namespace.is_empty() {
            "default"
        } else {
            e.namespace.as_str()
        };
        by_id.insert(
            format!("{ns}/{}", e.name),
            (
                i,
                EndpointSpec {
                    address: SocketAddr::from((ip, port)),
                    pod: e.name,
                    labels: e.labels,
                    engine,
                },
            ),
        );
    }
    let mut entries: Vec<(usize, EndpointSpec)> = by_id.into_values().collect();
    entries.sort_by_key(|(i, _)| *i);
    let mut endpoints: Vec<EndpointSpec> = Vec::with_capacity(entries.len());
    for (i, e) in entries {
        if endpoints.iter().any(|x| x.address == e.address) {
            errors.push(format!(
                "endpoint {:?} (endpoints[{i}]): {} is already listed",
                e.pod, e.address
            ));
            continue;
        }
        endpoints.push(e);
    }
    Ok((
        PoolSpec {
            name: pool.to_owned(),
            endpoints,
            models: Vec::new(),
            objectives: Default::default(),
            // Without Kubernetes llm-d runs no InferenceModelRewrite reconciler: none apply.
            rewrites: Some(Vec::new()),
        },
        errors,
    ))
}

/// Reads the file (1 MiB at most) and parses it.
pub fn read_endpoints(
    path: &Path,
    pool: &str,
) -> Result<(PoolSpec, Vec<String>), InvalidEndpointsFile> {
    let read = |source| InvalidEndpointsFile::Read {
        path: path.to_owned(),
        source,
    };
    let mut text = String::new();
    std::fs::File::open(path)
        .map_err(read)?
        .take(MAX_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(read)?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(InvalidEndpointsFile::TooLarge {
            path: path.to_owned(),
        });
    }
    parse_endpoints(path, &text, pool)
}

/// The first load: any invalid entry refuses the file, as llm-d's initial load fails.
pub fn load_endpoints(path: &Path, pool: &str) -> Result<PoolSpec, InvalidEndpointsFile> {
    let (spec, errors) = read_endpoints(path, pool)?;
    if errors.is_empty() {
        Ok(spec)
    } else {
        Err(InvalidEndpointsFile::Entries {
            path: path.to_owned(),
            errors,
        })
    }
}

/// A reload: invalid entries are logged and skipped, the valid ones apply.
pub fn reload_endpoints(path: &Path, pool: &str) -> Result<PoolSpec, InvalidEndpointsFile> {
    let (spec, errors) = read_endpoints(path, pool)?;
    for e in errors {
        tracing::error!(file = %path.display(), "{e}; entry skipped");
    }
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<(PoolSpec, Vec<String>), InvalidEndpointsFile> {
        parse_endpoints(Path::new("e.yaml"), text, "file-discovery")
    }

    #[test]
    fn reads_llm_d_readme_example() {
        let (spec, errors) = parse(
            "endpoints:\n  - name: vllm-0\n    address: \"10.0.0.1\"\n    port: \"8000\"\n  - name: vllm-1\n    address: \"10.0.0.2\"\n    port: \"8000\"\n    labels: {llm-d.ai/role: decode}\n",
        )
        .unwrap();
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(spec.name, "file-discovery");
        let got: Vec<(String, SocketAddr)> = spec
            .endpoints
            .iter()
            .map(|e| (e.pod.clone(), e.address))
            .collect();
        assert_eq!(
            got,
            vec![
                ("vllm-0".into(), "10.0.0.1:8000".parse().unwrap()),
                ("vllm-1".into(), "10.0.0.2:8000".parse().unwrap()),
            ]
        );
        assert_eq!(spec.endpoints[1].labels["llm-d.ai/role"], "decode");
        assert_eq!(spec.rewrites, Some(Vec::new()));
    }

    #[test]
    fn invalid_entries_are_named_and_the_rest_kept() {
        let (spec, errors) = parse(
            "endpoints:\n- {name: ok, address: 10.0.0.1, port: '8000'}\n- {name: v6, address: '::1', port: '8000'}\n- {name: host, address: vllm.local, port: '8000'}\n- {name: p0, address: 10.0.0.2, port: '0'}\n- {name: pbig, address: 10.0.0.2, port: '70000'}\n- {name: num, address: 10.0.0.3, port: 8001}\n- {name: dup, address: 10.0.0.1, port: '8000'}\n",
        )
        .unwrap();
        let names: Vec<&str> = spec.endpoints.iter().map(|e| e.pod.as_str()).collect();
        assert_eq!(names, vec!["ok", "num"]);
        assert_eq!(errors.len(), 5, "{errors:?}");
        assert!(errors[0].contains("\"v6\"") && errors[0].contains("IPv4"));
        assert!(
            errors
                .iter()
                .any(|e| e.contains("\"pbig\"") && e.contains("port"))
        );
        assert!(
            errors
                .iter()
                .any(|e| e.contains("\"dup\"") && e.contains("already listed"))
        );
        // The same namespace/name twice: the later entry wins.
        let (spec, errors) = parse(
            "endpoints:\n- {name: a, address: 10.0.0.1, port: '8000'}\n- {name: a, address: 10.0.0.9, port: '8000'}\n- {name: a, namespace: other, address: 10.0.0.1, port: '8000'}\n",
        )
        .unwrap();
        assert!(errors.is_empty(), "{errors:?}");
        let addrs: Vec<String> = spec
            .endpoints
            .iter()
            .map(|e| e.address.to_string())
            .collect();
        assert_eq!(addrs, vec!["10.0.0.9:8000", "10.0.0.1:8000"]);
    }

    #[test]
    fn file_level_problems_refuse_the_file() {
        assert!(matches!(
            parse("endpoints: {name: x}\n"),
            Err(InvalidEndpointsFile::Parse { message, .. }) if message.contains("endpoints")
        ));
        assert!(parse("").unwrap().0.endpoints.is_empty());
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.yaml");
        std::fs::write(&big, "#".repeat(MAX_FILE_BYTES as usize + 1)).unwrap();
        assert!(matches!(
            read_endpoints(&big, "p"),
            Err(InvalidEndpointsFile::TooLarge { .. })
        ));
        let bad = dir.path().join("bad.yaml");
        std::fs::write(&bad, "endpoints:\n- {name: x, address: nope, port: '1'}\n").unwrap();
        let e = load_endpoints(&bad, "p").unwrap_err();
        assert!(e.to_string().contains("\"x\""), "{e}");
        assert!(reload_endpoints(&bad, "p").unwrap().endpoints.is_empty());
    }
}
