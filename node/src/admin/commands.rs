//! `infermesh policy …`, `infermesh cluster …` and `infermesh tokens …`: admin API calls
//! printed as tables (default), JSON or YAML.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand, ValueEnum};
use http::Method;
use serde_json::Value;

use infermesh_raft_store::policy::TokenHash;

use super::client::{AdminClient, AdminTls, ClientError};

/// Default admin API address (loopback: the admin API is not for the open network).
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:9191";

/// How results are printed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Readable tables.
    #[default]
    Table,
    /// The API's JSON.
    Json,
    /// YAML (documents as `kubectl get -o yaml` would).
    Yaml,
}

/// Flags every admin command shares.
#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// Admin API of any node.
    #[arg(long, global = true, default_value = "http://127.0.0.1:9191")]
    pub server: String,
    /// File holding the bearer token (its first line that is neither blank nor a `#`
    /// comment): a write token for changes,
    /// a read or write token for reads once the cluster has read tokens.
    #[arg(long, global = true)]
    pub token_file: Option<PathBuf>,
    /// CA bundle (PEM) the admin API's certificate must chain to (https servers; default:
    /// the platform's roots).
    #[arg(long, global = true)]
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for an mTLS admin API.
    #[arg(long, global = true, requires = "key_file")]
    pub cert_file: Option<PathBuf>,
    /// Client private key (PEM) for an mTLS admin API.
    #[arg(long, global = true, requires = "cert_file")]
    pub key_file: Option<PathBuf>,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// `infermesh policy …`
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Apply a multi-document YAML file (all documents or none), like `kubectl apply -f`.
    Apply {
        /// The YAML file (`-` for stdin).
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// List the objects of a kind, or show one.
    Get {
        /// Kind (InferencePool, inferenceobjectives, ... or `all`).
        kind: String,
        /// Object name.
        name: Option<String>,
        /// Namespace (default: `default` for one object, all for a list).
        #[arg(short = 'n', long)]
        namespace: Option<String>,
    },
    /// Delete one object.
    Delete {
        /// Kind.
        kind: String,
        /// Object name.
        name: String,
        /// Namespace.
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
    },
}

/// `infermesh cluster …`
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Members, leader, term, commit/applied index and lag per member.
    Status,
    /// Remove a member (by Raft id) from the policy cluster.
    Remove {
        /// The member's Raft id (see `cluster status`).
        node: u64,
    },
}

/// `infermesh tokens …`: the admin tokens the cluster accepts, changed through policy.
/// Tokens are hashed here; only `sha256:` hashes are sent.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// The accepted token hashes per role (needs a write token).
    List,
    /// Accept more tokens in a role (a rotation's first step).
    Add(TokenArgs),
    /// Stop accepting tokens in a role (a rotation's last step; the last write token
    /// cannot be removed).
    Remove(TokenArgs),
}

/// Which tokens a `tokens add|remove` names.
#[derive(Debug, Args)]
pub struct TokenArgs {
    /// The role: `write` (everything) or `read` (reads only).
    #[arg(long, value_parser = ["write", "read"])]
    pub role: String,
    /// Files of tokens, one per line (`#` comments and blank lines skipped).
    #[arg(long = "from-file")]
    pub files: Vec<PathBuf>,
    /// Token hashes as `infermesh tokens list` prints them (`sha256:…`).
    #[arg(long = "hash")]
    pub hashes: Vec<String>,
}

/// A command failed before or at the API.
#[derive(Debug, thiserror::Error)]
enum CommandError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Usage(String),
}

fn read_file(path: &std::path::Path) -> Result<String, CommandError> {
    let read = || {
        if path.as_os_str() == "-" {
            std::io::read_to_string(std::io::stdin())
        } else {
            std::fs::read_to_string(path)
        }
    };
    read().map_err(|source| CommandError::Read {
        path: path.to_owned(),
        source,
    })
}

/// The tokens of a token file's text: one per line, `#` comments and blank lines skipped
/// (the format of `--admin-token-file` and of the CLI's `--token-file`).
pub fn tokens_in(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

/// Reads a token file (see [`tokens_in`]); one without a token is refused.
fn token_lines(path: &std::path::Path) -> Result<Vec<String>, CommandError> {
    let tokens = tokens_in(&read_file(path)?);
    if tokens.is_empty() {
        return Err(CommandError::Usage(format!(
            "{} holds no token",
            path.display()
        )));
    }
    Ok(tokens)
}

fn client(args: &ServerArgs, needs_token: bool) -> Result<AdminClient, CommandError> {
    let token = match &args.token_file {
        // The first token of the file: the same format the server's token files use.
        Some(p) => token_lines(p)?.into_iter().next(),
        None if needs_token => {
            return Err(CommandError::Usage(
                "writes need a token: pass --token-file FILE".into(),
            ));
        }
        None => None,
    };
    let tls = AdminTls {
        ca_file: args.ca_file.clone(),
        cert_file: args.cert_file.clone(),
        key_file: args.key_file.clone(),
    };
    Ok(AdminClient::with_tls(&args.server, token, &tls)?)
}

fn finish(r: Result<String, CommandError>) -> ExitCode {
    match r {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            if let CommandError::Client(ClientError::Api { body, .. }) = &e
                && let Some(f) = body.pointer("/error/field").and_then(Value::as_str)
                && !f.is_empty()
            {
                let doc = body.pointer("/error/document").and_then(Value::as_u64);
                eprintln!("  at document {}, field `{f}`", doc.unwrap_or(0));
            }
            ExitCode::FAILURE
        }
    }
}

fn runtime_block<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime builds")
        .block_on(f)
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn render(value: &Value, output: Output, table: impl FnOnce(&Value) -> String) -> String {
    match output {
        Output::Json => format!(
            "{}\n",
            serde_json::to_string_pretty(value).unwrap_or_default()
        ),
        Output::Yaml => serde_yaml_ng::to_string(value).unwrap_or_default(),
        Output::Table => table(value),
    }
}

/// Runs `infermesh policy …`.
pub fn run_policy(cmd: PolicyCommand, args: ServerArgs) -> ExitCode {
    finish(runtime_block(policy(cmd, &args)))
}

/// Runs `infermesh tokens …`.
pub fn run_tokens(cmd: TokenCommand, args: ServerArgs) -> ExitCode {
    finish(runtime_block(tokens(cmd, &args)))
}

/// The hashes a `tokens add|remove` names, in order, without repeats.
fn named_hashes(t: &TokenArgs) -> Result<Vec<String>, CommandError> {
    let mut out: Vec<String> = Vec::new();
    for f in &t.files {
        for token in token_lines(f)? {
            out.push(TokenHash::of(&token).to_text());
        }
    }
    for h in &t.hashes {
        TokenHash::parse(h).map_err(|e| CommandError::Usage(format!("--hash {e}")))?;
        out.push(h.to_ascii_lowercase());
    }
    let mut seen = std::collections::HashSet::new();
    out.retain(|h| seen.insert(h.clone()));
    if out.is_empty() {
        return Err(CommandError::Usage(
            "name the tokens: --from-file FILE or --hash sha256:…".into(),
        ));
    }
    Ok(out)
}

async fn tokens(cmd: TokenCommand, args: &ServerArgs) -> Result<String, CommandError> {
    let c = client(args, true)?;
    let (t, field) = match cmd {
        TokenCommand::List => {
            let v = c.call(Method::GET, "/v1/tokens", None).await?;
            return Ok(render(&v, args.output, |v| {
                let mut rows = Vec::new();
                for role in ["write", "read"] {
                    for h in v[role].as_array().into_iter().flatten() {
                        rows.push(vec![role.to_owned(), s(h)]);
                    }
                }
                table(&["ROLE", "HASH"], &rows)
            }));
        }
        TokenCommand::Add(t) => (t, "add"),
        TokenCommand::Remove(t) => (t, "remove"),
    };
    let hashes = named_hashes(&t)?;
    let body = serde_json::json!({"changes": [{"role": t.role, field: hashes}]});
    let v = c
        .call(
            Method::POST,
            "/v1/tokens",
            Some(body.to_string().into_bytes()),
        )
        .await?;
    Ok(render(&v, args.output, |v| {
        let verb = if field == "add" { "added" } else { "removed" };
        format!(
            "{} {} token(s) {verb} at index {}\n",
            hashes.len(),
            t.role,
            s(&v["index"])
        )
    }))
}

/// Runs `infermesh cluster …`.
pub fn run_cluster(cmd: ClusterCommand, args: ServerArgs) -> ExitCode {
    finish(runtime_block(cluster(cmd, &args)))
}

async fn policy(cmd: PolicyCommand, args: &ServerArgs) -> Result<String, CommandError> {
    match cmd {
        PolicyCommand::Apply { file } => {
            let body = read_file(&file)?;
            let c = client(args, true)?;
            let v = c
                .call(Method::POST, "/v1/policy", Some(body.into_bytes()))
                .await?;
            Ok(render(&v, args.output, changes_table))
        }
        PolicyCommand::Delete {
            kind,
            name,
            namespace,
        } => {
            let c = client(args, true)?;
            let path = format!(
                "/v1/policy/{}/{}?namespace={}",
                encode(&kind),
                encode(&name),
                encode(&namespace)
            );
            let v = c.call(Method::DELETE, &path, None).await?;
            Ok(render(&v, args.output, changes_table))
        }
        PolicyCommand::Get {
            kind,
            name,
            namespace,
        } => {
            let c = client(args, false)?;
            let ns = namespace
                .as_deref()
                .map(|n| format!("?namespace={}", encode(n)))
                .unwrap_or_default();
            match name {
                Some(name) => {
                    let v = c
                        .call(
                            Method::GET,
                            &format!("/v1/policy/{}/{}{ns}", encode(&kind), encode(&name)),
                            None,
                        )
                        .await?;
                    Ok(render(&v, args.output, |v| {
                        objects_table(std::slice::from_ref(v))
                    }))
                }
                None => {
                    let path = if kind.eq_ignore_ascii_case("all") {
                        format!("/v1/policy{ns}")
                    } else {
                        format!("/v1/policy/{}{ns}", encode(&kind))
                    };
                    let v = c.call(Method::GET, &path, None).await?;
                    Ok(render(&v, args.output, |v| {
                        objects_table(v["items"].as_array().map_or(&[][..], Vec::as_slice))
                    }))
                }
            }
        }
    }
}

async fn cluster(cmd: ClusterCommand, args: &ServerArgs) -> Result<String, CommandError> {
    match cmd {
        ClusterCommand::Status => {
            let c = client(args, false)?;
            let v = c.call(Method::GET, "/v1/cluster/status", None).await?;
            Ok(render(&v, args.output, status_table))
        }
        ClusterCommand::Remove { node } => {
            let c = client(args, true)?;
            let v = c
                .call(Method::DELETE, &format!("/v1/cluster/members/{node}"), None)
                .await?;
            Ok(render(&v, args.output, |_| {
                format!("member {node} removed\n")
            }))
        }
    }
}

/// Left-aligned columns, two spaces apart.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let l: Vec<String> = cells
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(l.join("  ").trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for r in rows {
        line(&mut r.iter().map(String::as_str));
    }
    out
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn changes_table(v: &Value) -> String {
    let mut out = String::new();
    for c in v["changes"].as_array().map_or(&[][..], Vec::as_slice) {
        out.push_str(&format!(
            "{}/{}/{} {}\n",
            s(&c["kind"]).to_lowercase(),
            s(&c["namespace"]),
            s(&c["name"]),
            s(&c["action"])
        ));
    }
    out.push_str(&format!("(log index {})\n", s(&v["index"])));
    out
}

fn summary(doc: &Value) -> String {
    let spec = &doc["spec"];
    match doc["kind"].as_str().unwrap_or("") {
        "InferencePool" => format!(
            "selector={} ports={}",
            spec["selector"]["matchLabels"], spec["targetPorts"]
        ),
        "InferenceObjective" => format!(
            "priority={} pool={}",
            s(&spec["priority"]),
            s(&spec["poolRef"]["name"])
        ),
        "InferenceModelRewrite" => format!(
            "pool={} rules={}",
            s(&spec["poolRef"]["name"]),
            spec["rules"].as_array().map_or(0, Vec::len)
        ),
        "InferenceEndpoints" => format!(
            "endpoints={}",
            spec["endpoints"].as_array().map_or(0, Vec::len)
        ),
        "InfermeshNode" => format!(
            "raftId={} extProc={}",
            s(&spec["raftId"]),
            s(&spec["extProcAddress"])
        ),
        "EndpointPickerConfig" => {
            format!("plugins={}", doc["plugins"].as_array().map_or(0, Vec::len))
        }
        _ => String::new(),
    }
}

fn objects_table(items: &[Value]) -> String {
    if items.is_empty() {
        return "No objects found.\n".into();
    }
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|d| {
            vec![
                s(&d["kind"]),
                s(&d["metadata"]["namespace"]),
                s(&d["metadata"]["name"]),
                s(&d["metadata"]["resourceVersion"]),
                summary(d),
            ]
        })
        .collect();
    table(&["KIND", "NAMESPACE", "NAME", "VERSION", "SUMMARY"], &rows)
}

fn status_table(v: &Value) -> String {
    let raft = &v["raft"];
    let leader = raft["leader"].as_u64();
    let name_of = |id: &Value| {
        v["registry"][s(id)]["name"]
            .as_str()
            .unwrap_or("?")
            .to_owned()
    };
    let mut out = format!(
        "node {} (raft id {}) is {}; leader {} ({}); term {}\n\
         log: last {}  committed {}  applied {}  snapshot {}  purged {}\n\n",
        s(&v["node"]["name"]),
        s(&raft["id"]),
        s(&raft["role"]),
        leader.map_or("none".into(), |l| l.to_string()),
        leader.map_or("-".into(), |l| name_of(&Value::from(l))),
        s(&raft["term"]),
        s(&raft["last_log_index"]),
        s(&raft["committed_index"]),
        s(&raft["applied_index"]),
        s(&raft["snapshot_index"]),
        s(&raft["purged_index"]),
    );
    let rows: Vec<Vec<String>> = raft["members"]
        .as_array()
        .map_or(&[][..], Vec::as_slice)
        .iter()
        .map(|m| {
            let id = m["id"].as_u64();
            let role = if id == leader {
                "leader"
            } else if m["voter"].as_bool() == Some(true) {
                "voter"
            } else {
                "learner"
            };
            vec![
                s(&m["id"]),
                name_of(&m["id"]),
                role.to_owned(),
                s(&v["registry"][s(&m["id"])]["adminAddress"]),
                s(&m["matched_index"]),
                s(&m["lag"]),
            ]
        })
        .collect();
    out.push_str(&table(
        &["ID", "NAME", "ROLE", "ADMIN", "MATCHED", "LAG"],
        &rows,
    ));
    if leader != raft["id"].as_u64() {
        out.push_str("(matched index and lag are known on the leader only)\n");
    }
    out
}
