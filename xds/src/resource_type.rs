//! The four xDS resource types this server serves, in make-before-break order.

use serde::Serialize;

/// One xDS resource type. The declaration order is the push order (CDS → EDS → LDS → RDS):
/// clusters exist before their endpoints, listeners before the routes they name, so an
/// Envoy never holds a reference to something it has not been given yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ResourceType {
    /// `envoy.config.cluster.v3.Cluster` (CDS).
    Cluster,
    /// `envoy.config.endpoint.v3.ClusterLoadAssignment` (EDS).
    Endpoint,
    /// `envoy.config.listener.v3.Listener` (LDS).
    Listener,
    /// `envoy.config.route.v3.RouteConfiguration` (RDS).
    Route,
}

impl ResourceType {
    /// Every type, in push order.
    pub const ALL: [ResourceType; 4] = [
        ResourceType::Cluster,
        ResourceType::Endpoint,
        ResourceType::Listener,
        ResourceType::Route,
    ];

    /// The type URL Envoy puts in requests and expects in responses.
    pub const fn type_url(self) -> &'static str {
        match self {
            ResourceType::Cluster => "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            ResourceType::Endpoint => {
                "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
            }
            ResourceType::Listener => "type.googleapis.com/envoy.config.listener.v3.Listener",
            ResourceType::Route => "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
        }
    }

    /// Parses a type URL; `None` for types this server does not serve.
    pub fn from_type_url(url: &str) -> Option<ResourceType> {
        ResourceType::ALL.into_iter().find(|t| t.type_url() == url)
    }

    /// Index into per-type arrays.
    pub const fn index(self) -> usize {
        self as usize
    }

    /// Whether an empty first SotW/Delta request means "everything" (legacy wildcard):
    /// true for LDS and CDS, false for RDS and EDS, as the xDS protocol defines.
    pub const fn legacy_wildcard(self) -> bool {
        matches!(self, ResourceType::Cluster | ResourceType::Listener)
    }

    /// Short name used in status output and logs.
    pub const fn short_name(self) -> &'static str {
        match self {
            ResourceType::Cluster => "CDS",
            ResourceType::Endpoint => "EDS",
            ResourceType::Listener => "LDS",
            ResourceType::Route => "RDS",
        }
    }
}

impl std::fmt::Display for ResourceType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.short_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_urls_round_trip() {
        for t in ResourceType::ALL {
            assert_eq!(ResourceType::from_type_url(t.type_url()), Some(t));
        }
        assert_eq!(
            ResourceType::from_type_url(
                "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
            ),
            None
        );
    }

    #[test]
    fn push_order_is_make_before_break() {
        assert!(ResourceType::Cluster < ResourceType::Endpoint);
        assert!(ResourceType::Endpoint < ResourceType::Listener);
        assert!(ResourceType::Listener < ResourceType::Route);
    }
}
