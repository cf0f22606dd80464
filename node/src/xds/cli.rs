//! `infermesh xds …` subcommands.

use std::process::ExitCode;

use clap::{Subcommand, ValueEnum};

/// `infermesh xds …`
#[derive(Debug, Subcommand)]
pub enum XdsCommand {
    /// Per-Envoy sync status of a node's xDS server: what each client was last sent, what
    /// it last accepted, and why it last rejected something.
    Status {
        /// The node's admin API (HOST:PORT or http://HOST:PORT); a node without Raft
        /// serves the same route on its --metrics-addr.
        #[arg(long, default_value = "http://127.0.0.1:9191")]
        server: String,
        /// Ask these nodes over CSDS instead (their ADS gRPC address, HOST:PORT; the
        /// ext_proc port unless the node has --xds-addr), per Envoy and type; comma-separated
        /// or repeated. `--server` is then not used.
        #[arg(long, value_delimiter = ',')]
        xds: Vec<String>,
        /// Output format.
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: Output,
        /// The admin API's bearer token file (needed once the cluster has read tokens).
        #[arg(long)]
        token_file: Option<std::path::PathBuf>,
        /// CA bundle (PEM) the admin API's certificate must chain to (https servers).
        #[arg(long)]
        ca_file: Option<std::path::PathBuf>,
        /// Client certificate (PEM) for an mTLS admin API.
        #[arg(long, requires = "key_file")]
        cert_file: Option<std::path::PathBuf>,
        /// Client private key (PEM) for an mTLS admin API.
        #[arg(long, requires = "cert_file")]
        key_file: Option<std::path::PathBuf>,
    },
    /// Print an Envoy bootstrap that takes its listeners and clusters from the tier over
    /// ADS, with the keepalives and health checks that move it off a stalled node.
    Bootstrap {
        /// Envoy's node id.
        #[arg(long)]
        node_id: String,
        /// Every node's ADS address, HOST:PORT (comma-separated or repeated).
        #[arg(long, required = true, value_delimiter = ',')]
        xds: Vec<String>,
        /// Use Delta (incremental) ADS instead of State of the World.
        #[arg(long)]
        delta: bool,
        /// Envoy's admin listener.
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin_addr: std::net::SocketAddr,
        /// Output format.
        #[arg(long, value_enum, default_value = "yaml")]
        format: BootstrapFormat,
        /// For a tier serving mTLS: the CA file (on the Envoy's host) the nodes'
        /// certificate chains to; the ADS cluster then speaks mTLS.
        #[arg(long, requires_all = ["tls_cert_file", "tls_key_file", "tls_sni"])]
        tls_ca_file: Option<String>,
        /// The Envoy's client certificate file.
        #[arg(long, requires = "tls_ca_file")]
        tls_cert_file: Option<String>,
        /// The Envoy's client key file.
        #[arg(long, requires = "tls_ca_file")]
        tls_key_file: Option<String>,
        /// The server name the nodes' certificate must carry.
        #[arg(long, requires = "tls_ca_file")]
        tls_sni: Option<String>,
    },
}

/// Bootstrap file formats (Envoy reads both).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BootstrapFormat {
    /// YAML.
    Yaml,
    /// JSON.
    Json,
}

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Human-readable table.
    Table,
    /// The status route's JSON, pretty-printed (with `--xds`, the table's rows as JSON).
    Json,
}

/// Runs an `xds` subcommand.
pub fn run(cmd: XdsCommand) -> ExitCode {
    match cmd {
        XdsCommand::Bootstrap {
            node_id,
            xds,
            delta,
            admin_addr,
            format,
            tls_ca_file,
            tls_cert_file,
            tls_key_file,
            tls_sni,
        } => {
            let mut opts = infermesh_xds::BootstrapOptions::new(node_id, xds);
            opts.admin = admin_addr;
            if delta {
                opts.api = infermesh_xds::AdsApi::Delta;
            }
            opts.tls = super::envoy_tls_files(
                tls_ca_file.as_ref(),
                tls_cert_file.as_ref(),
                tls_key_file.as_ref(),
                tls_sni.as_ref(),
            );
            bootstrap(&opts, format)
        }
        XdsCommand::Status {
            server,
            xds,
            output,
            token_file,
            ca_file,
            cert_file,
            key_file,
        } => {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            if !xds.is_empty() {
                return rt.block_on(csds_status(&xds, output));
            }
            let token = match token_file
                .as_deref()
                .map(std::fs::read_to_string)
                .transpose()
            {
                Ok(t) => t.and_then(|t| crate::admin::commands::tokens_in(&t).into_iter().next()),
                Err(e) => {
                    eprintln!("error: --token-file: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let tls = crate::admin::client::AdminTls {
                ca_file,
                cert_file,
                key_file,
            };
            match rt.block_on(super::status::fetch(&server, token, &tls)) {
                Ok(v) => {
                    match output {
                        Output::Json => println!(
                            "{}",
                            serde_json::to_string_pretty(&v).unwrap_or_else(|_| v.to_string())
                        ),
                        Output::Table => print!("{}", super::status::render_table(&v)),
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: xds status from {server}: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// `infermesh xds status --xds …`: every node asked over CSDS, one after the other; fails
/// if any node could not be asked, after printing what the others said.
async fn csds_status(servers: &[String], output: Output) -> ExitCode {
    let mut answers = Vec::with_capacity(servers.len());
    let mut failed = false;
    for server in servers {
        match super::csds::fetch(server).await {
            Ok(resp) => answers.push((server.clone(), super::csds::rows(server, &resp))),
            Err(e) => {
                eprintln!("error: xds status from {server}: {e}");
                failed = true;
            }
        }
    }
    match output {
        Output::Table => print!("{}", super::csds::render_table(&answers)),
        Output::Json => {
            let rows: Vec<_> = answers.iter().flat_map(|(_, rows)| rows).collect();
            match serde_json::to_string_pretty(&rows) {
                Ok(text) => println!("{text}"),
                Err(e) => {
                    eprintln!("error: cannot print the status: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// `infermesh xds bootstrap`.
fn bootstrap(opts: &infermesh_xds::BootstrapOptions, format: BootstrapFormat) -> ExitCode {
    let value = match infermesh_xds::envoy_bootstrap(opts) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(crate::exit::EXIT_CONFIG);
        }
    };
    let text = match format {
        BootstrapFormat::Json => serde_json::to_string_pretty(&value).map_err(|e| e.to_string()),
        BootstrapFormat::Yaml => serde_yaml_ng::to_string(&value).map_err(|e| e.to_string()),
    };
    match text {
        Ok(t) => {
            println!("{t}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: cannot print the bootstrap: {e}");
            ExitCode::FAILURE
        }
    }
}
