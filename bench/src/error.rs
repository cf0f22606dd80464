//! Errors a benchmark run can end with.

use std::path::PathBuf;

/// Why a benchmark could not run or could not save its results. No partial results are
/// written when a run fails before its report is built.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A field of the run spec is out of range or inconsistent; nothing was sent.
    #[error("invalid run spec: `{field}` {problem}")]
    InvalidSpec {
        /// The offending field, by its name in the spec or flag.
        field: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// A base URL could not be turned into a request URI; nothing was sent.
    #[error("invalid URL {url:?}: {source}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// The parse failure.
        source: http::uri::InvalidUri,
    },
    /// A pod's `/metrics` could not be read or understood.
    #[error("scraping {url}/metrics: {source}")]
    Scrape {
        /// The pod base URL.
        url: String,
        /// What went wrong.
        source: crate::scrape::ScrapeError,
    },
    /// Writing a result file failed.
    #[error("writing {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The IO failure.
        source: std::io::Error,
    },
    /// Reading back a saved report failed.
    #[error("reading report {path}: {source}")]
    ReadReport {
        /// The JSON file.
        path: PathBuf,
        /// The decode failure.
        source: serde_json::Error,
    },
    /// Drawing the SVG plot failed.
    #[error("drawing plot {path}: {message}")]
    Plot {
        /// The SVG file.
        path: PathBuf,
        /// The drawing backend's message (plotters errors are not `Send`).
        message: String,
    },
}
