//! Benchmark client.
