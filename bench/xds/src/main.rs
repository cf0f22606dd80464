//! `infermesh-xds-bench`: opens many concurrent ADS streams that ACK like Envoy against an
//! xDS server in a child process, and reports memory per stream and push-to-ACK latency.

use clap::Parser;
use infermesh_xds_bench::{Cli, Command};

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Runtime::new()?;
    match cli.command {
        Command::Serve(args) => rt.block_on(infermesh_xds_bench::serve(args)),
        Command::Run(args) => rt.block_on(infermesh_xds_bench::run(args)),
        Command::Fleet(args) => rt.block_on(infermesh_xds_bench::fleet(args)),
    }
}
