//! The `infermesh` binary: parses flags and hands them to the library.
use clap::Parser;

// The request path allocates small, short-lived buffers on several threads; mimalloc's
// per-thread free lists cost a fraction of glibc's malloc there (measured on the proxy:
// bench/dataplane).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    infermesh_node::cli::run(infermesh_node::cli::Cli::parse())
}
