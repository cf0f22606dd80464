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
        /// Output format.
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: Output,
    },
}

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Human-readable table.
    Table,
    /// The status route's JSON, pretty-printed.
    Json,
}

/// Runs an `xds` subcommand.
pub fn run(cmd: XdsCommand) -> ExitCode {
    match cmd {
        XdsCommand::Status { server, output } => {
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
            match rt.block_on(super::status::fetch(&server)) {
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
