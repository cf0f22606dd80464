//! `infermesh-demo`: starts simulated pods and a tier of three infermesh nodes on
//! loopback, runs a shared-prefix workload through the tier (killing one node mid-run)
//! and through client-side round-robin, and prints the comparison. Run as
//! `infermesh-demo node ARGS…` it is one of those nodes (`infermesh ARGS…`), so the demo
//! needs no other binary.

use std::process::ExitCode;

use clap::Parser;
use infermesh_e2e::demo::{self, DemoArgs};

/// Simulated vLLM pods and three infermesh nodes on 127.0.0.1 (behind Envoy when it is
/// installed): the same shared-prefix workload through the tier, one node SIGKILLed
/// mid-run, and through client-side round-robin, and a comparison table.
#[derive(Debug, Parser)]
#[command(name = "infermesh-demo", version)]
struct Cli {
    #[command(flatten)]
    args: DemoArgs,
}

fn main() -> ExitCode {
    if let Some(code) = demo::tier::node_process() {
        return code;
    }
    let cli = Cli::parse();
    // The demo prints a report; per-endpoint logs would bury it.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    let report = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(demo::run(cli.args)));
    match report {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("infermesh-demo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}
