//! Simulated vLLM pods.
