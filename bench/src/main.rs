//! `infermesh-bench`: runs benchmark workloads against OpenAI-compatible endpoints.

use clap::Parser;
use infermesh_bench::{BenchError, Cli, run_cli};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match run_cli(Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // Library errors already name their cause; print each cause only once.
            let mut msg = e.to_string();
            for cause in e.chain().skip(1) {
                let c = cause.to_string();
                if !msg.contains(&c) {
                    msg = format!("{msg}: {c}");
                }
            }
            eprintln!("error: {msg}");
            let bad_input = matches!(
                e.downcast_ref::<BenchError>(),
                Some(BenchError::InvalidSpec { .. } | BenchError::InvalidUrl { .. })
            );
            std::process::ExitCode::from(if bad_input { 64 } else { 1 })
        }
    }
}
