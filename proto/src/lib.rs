//! Wire types shared by the infermesh crates.
//!
//! Envoy's xDS and ext_proc messages and gRPC services come precompiled from
//! `envoy-types` (tonic 0.14, prost 0.14), so building infermesh needs no `protoc`.
//! This crate holds no logic: other crates convert these types to their own
//! domain types at the edge (`TryFrom`), so protobuf never leaks into the cores.

pub use envoy_types;
pub use envoy_types::pb::envoy;
pub use envoy_types::pb::google;
pub use prost;
pub use prost_types;
pub use tonic;
