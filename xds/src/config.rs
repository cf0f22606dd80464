//! Tunables of the xDS server and of the Envoy resources it generates.

use std::num::NonZeroU32;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// xDS server and translation settings. Defaults are chosen so that a dead infermesh node
/// leaves the ext_proc rotation within a couple of seconds and membership changes reach
/// every Envoy well within a second.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct XdsConfig {
    /// Publishes arriving within this window are coalesced into one push.
    pub debounce: Duration,
    /// Name of the cluster (and load assignment) holding every live infermesh node. Envoy
    /// uses it as the `:authority` of ext_proc streams and health checks, so it must be a
    /// valid host name (letters, digits, '-', '.', '_').
    pub ext_proc_cluster: String,
    /// Connect timeout to an infermesh node.
    pub ext_proc_connect_timeout: Duration,
    /// gRPC health-check service name Envoy asks the nodes about (the GIE EPP name).
    pub health_check_service: String,
    /// Interval between active health checks of each node.
    pub health_check_interval: Duration,
    /// Timeout of one health check.
    pub health_check_timeout: Duration,
    /// Failed checks before a node is taken out.
    pub unhealthy_threshold: NonZeroU32,
    /// Passed checks before a node is put back.
    pub healthy_threshold: NonZeroU32,
    /// Consecutive gateway failures (connect errors, resets) before a node is ejected.
    pub outlier_consecutive_gateway_failure: NonZeroU32,
    /// Base ejection time of an outlier.
    pub outlier_base_ejection_time: Duration,
    /// Largest share of nodes that outlier detection may eject at once, in percent.
    pub outlier_max_ejection_percent: u32,
    /// Connect timeout to model servers.
    pub upstream_connect_timeout: Duration,
    /// Per-request timeout on the pool route; zero disables it (LLM responses stream for long).
    pub route_timeout: Duration,
    /// Metadata header naming the pool on each ext_proc stream, so one picker tier serves
    /// many pools.
    pub pool_header: String,
    /// mTLS from the Envoys to the ext_proc cluster (files on the Envoys' hosts); `None`
    /// = plaintext, for a tier serving its gRPC port without TLS.
    pub ext_proc_tls: Option<crate::upstream_tls::UpstreamTlsFiles>,
}

impl Default for XdsConfig {
    fn default() -> Self {
        Self {
            debounce: Duration::from_millis(50),
            ext_proc_cluster: "infermesh-ext-proc".into(),
            ext_proc_connect_timeout: Duration::from_secs(1),
            health_check_service: "envoy.service.ext_proc.v3.ExternalProcessor".into(),
            health_check_interval: Duration::from_secs(1),
            health_check_timeout: Duration::from_secs(1),
            unhealthy_threshold: NonZeroU32::new(2).expect("non-zero"),
            healthy_threshold: NonZeroU32::new(1).expect("non-zero"),
            outlier_consecutive_gateway_failure: NonZeroU32::new(3).expect("non-zero"),
            outlier_base_ejection_time: Duration::from_secs(10),
            outlier_max_ejection_percent: 50,
            ext_proc_tls: None,
            upstream_connect_timeout: Duration::from_secs(2),
            route_timeout: Duration::ZERO,
            pool_header: "x-infermesh-pool".into(),
        }
    }
}

/// A field of [`XdsConfig`] out of range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidXdsConfig {
    /// A duration that must be positive is zero.
    #[error("xds config field {field} must be above zero")]
    Zero {
        /// The field.
        field: &'static str,
    },
    /// `outlierMaxEjectionPercent` above 100.
    #[error("xds config field outlierMaxEjectionPercent must be at most 100, got {0}")]
    EjectionPercent(u32),
    /// `extProcCluster` is not usable as an HTTP/2 `:authority`.
    #[error(
        "xds config field extProcCluster {0:?} must be letters, digits, '-', '.' or '_' (Envoy sends it as :authority)"
    )]
    ClusterName(String),
    /// A name field is empty.
    #[error("xds config field {field} must not be empty")]
    EmptyName {
        /// The field.
        field: &'static str,
    },
}

impl XdsConfig {
    /// Checks every field.
    pub fn validate(&self) -> Result<(), InvalidXdsConfig> {
        for (field, d) in [
            ("extProcConnectTimeout", self.ext_proc_connect_timeout),
            ("healthCheckInterval", self.health_check_interval),
            ("healthCheckTimeout", self.health_check_timeout),
            ("outlierBaseEjectionTime", self.outlier_base_ejection_time),
            ("upstreamConnectTimeout", self.upstream_connect_timeout),
        ] {
            if d.is_zero() {
                return Err(InvalidXdsConfig::Zero { field });
            }
        }
        if self.outlier_max_ejection_percent > 100 {
            return Err(InvalidXdsConfig::EjectionPercent(
                self.outlier_max_ejection_percent,
            ));
        }
        for (field, s) in [
            ("extProcCluster", &self.ext_proc_cluster),
            ("poolHeader", &self.pool_header),
        ] {
            if s.is_empty() {
                return Err(InvalidXdsConfig::EmptyName { field });
            }
        }
        if !self
            .ext_proc_cluster
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        {
            return Err(InvalidXdsConfig::ClusterName(self.ext_proc_cluster.clone()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_fields_are_checked() {
        XdsConfig::default().validate().unwrap();
        let cfg = XdsConfig {
            health_check_interval: Duration::ZERO,
            ..Default::default()
        };
        assert_eq!(
            cfg.validate(),
            Err(InvalidXdsConfig::Zero {
                field: "healthCheckInterval"
            })
        );
        let cfg = XdsConfig {
            outlier_max_ejection_percent: 101,
            ..Default::default()
        };
        assert_eq!(cfg.validate(), Err(InvalidXdsConfig::EjectionPercent(101)));
    }
}
