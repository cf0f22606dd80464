//! The cheapest processor that still speaks the full-duplex EPP exchange, as a baseline for
//! `bench/dataplane`: the testkit's minimal processor (it answers exactly the messages
//! infermesh answers, but picks pods round-robin and parses nothing). Envoy + this processor
//! minus Envoy's static route is what the protocol itself costs on this machine;
//! infermesh's own share is the rest.
//!
//!   extproc-null --listen 127.0.0.1:9002 --pods 127.0.0.1:8000,127.0.0.1:8001

use std::net::SocketAddr;

use clap::Parser;
use infermesh_testkit::extproc::MinimalProcessor;

#[derive(Debug, Parser)]
struct Args {
    /// gRPC listen address.
    #[arg(long)]
    listen: SocketAddr,
    /// Pods to pick from, round-robin (comma-separated ip:port).
    #[arg(long, value_delimiter = ',', required = true)]
    pods: Vec<SocketAddr>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let processor = MinimalProcessor::new(&args.pods);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let listener = tokio::net::TcpListener::bind(args.listen).await?;
            processor.serve(listener).await?;
            Ok(())
        })
}
