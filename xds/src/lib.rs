//! infermesh's xDS management server.
//!
//! Contract: given an [`XdsInput`] (inference pools, live infermesh nodes, proxyless gRPC
//! service names), every node serves Envoy — and gRPC's own xDS client — the same
//! resources over ADS, both State-of-the-World and Delta, for LDS, RDS, CDS and EDS:
//!
//! - per InferencePool, a listener running the GIE ext_proc filter (FULL_DUPLEX_STREAMED,
//!   failure mode from `endpointPickerRef.failureMode`) and a route to an ORIGINAL_DST
//!   cluster that reads `x-gateway-destination-endpoint`; one ext_proc cluster (EDS,
//!   HTTP/2, health checks, outlier detection) whose endpoints are every live node;
//! - versions are content hashes, so the same input gives the same versions on every
//!   node and a client reconnecting elsewhere is not pushed anything;
//! - inputs are validated and the translated snapshot is checked for consistency before
//!   it is published; a refused input changes nothing;
//! - per stream: nonces, stale-nonce rejection, one response in flight per type,
//!   make-before-break order (CDS → EDS → LDS → RDS, each waiting for the previous ACK;
//!   in Delta, cluster removals wait until listeners and routes stop naming them),
//!   ACK/NACK tracking; a NACKed version is not pushed again and the client's last
//!   accepted configuration stays what it is served;
//! - nothing is served before the first publish, so a restarted node never hands a
//!   reconnecting Envoy an empty configuration; [`XdsServer::close_streams`] ends every
//!   stream when a node drains so its clients move to another node;
//! - per Envoy node, a sync status (last sent, last ACKed, NACK detail) to query, as JSON
//!   ([`XdsServer::sync_status`]) and over CSDS ([`XdsServer::csds_service`]), per resource.
//!
//! The snapshot cache ([`Snapshot`]) and the stream state machines ([`SotwStream`],
//! [`DeltaStream`]) are IO-free; [`XdsServer`] and its tonic service are the thin IO edge.
//! This crate never picks endpoints.
//!
//! Wiring it into a node takes a few lines:
//!
//! ```no_run
//! # async fn wire(grpc: tonic::transport::server::Router) -> Result<(), Box<dyn std::error::Error>> {
//! use infermesh_xds::{InferencePoolSpec, XdsConfig, XdsInput, XdsServer};
//! let xds = XdsServer::new(XdsConfig::default())?; // inside the tokio runtime
//! let grpc = grpc
//!     .add_service(xds.service()) // next to ext_proc on the node's gRPC port
//!     .add_service(xds.csds_service());
//! // On every policy, membership or endpoint change:
//! xds.publish(&XdsInput {
//!     pools: vec![InferencePoolSpec::new("llama", "0.0.0.0:8080".parse()?, vec![8000])],
//!     ext_proc_endpoints: vec!["10.0.0.1:9002".parse()?, "10.0.0.2:9002".parse()?],
//!     grpc_services: vec!["infermesh-epp".into()],
//! })?;
//! // On drain, before stopping the gRPC server: xds.close_streams();
//! // Admin API / `infermesh xds status`:
//! let status_json = serde_json::to_string(&xds.sync_status())?;
//! # let _ = (grpc, status_json); Ok(()) }
//! ```

pub mod bootstrap;
mod codec;
pub mod config;
mod csds;
mod delta;
pub mod error;
pub mod input;
mod resource_type;
mod server;
mod service;
mod shared;
pub mod snapshot;
mod sotw;
pub mod status;
mod stream;
mod stream_core;
pub mod translate;
pub mod upstream_tls;
mod vec_map;

pub use bootstrap::{AdsApi, BootstrapError, BootstrapOptions, envoy_bootstrap};
pub use config::{InvalidXdsConfig, XdsConfig};
pub use csds::{CsdsError, CsdsService};
pub use delta::DeltaStream;
pub use error::{Inconsistency, InvalidInput, PublishError};
pub use input::{AppProtocol, FailureMode, InferencePoolSpec, XdsInput};
pub use resource_type::ResourceType;
pub use server::{PublishReceipt, XdsServer};
pub use service::AdsService;
pub use snapshot::{EncodedResponse, Snapshot, TypeSnapshot};
pub use sotw::SotwStream;
pub use status::{EnvoySyncStatus, SyncStatus, TypeSyncStatus};
pub use stream::{NackDetail, NodeMemory, StreamEvent, TypeMemory};
pub use upstream_tls::UpstreamTlsFiles;
pub use vec_map::{VecMap, VecSet};
