//! The `infermesh` binary: parses flags and hands them to the library.
use clap::Parser;

fn main() -> std::process::ExitCode {
    infermesh_node::cli::run(infermesh_node::cli::Cli::parse())
}
