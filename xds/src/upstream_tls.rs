//! Mutual TLS from an Envoy to the tier: the transport socket of the ADS cluster in a
//! generated bootstrap and of the ext_proc cluster served over CDS, naming files on the
//! Envoy's own filesystem (its client certificate and key, the CA the nodes' certificate
//! chains to).

use infermesh_proto::envoy::config::core::v3 as core;
use infermesh_proto::envoy::extensions::transport_sockets::tls::v3 as tls;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// Files an Envoy uses for mTLS to infermesh nodes (paths on the Envoy's host).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct UpstreamTlsFiles {
    /// CA bundle the nodes' server certificates chain to.
    pub ca_file: String,
    /// Envoy's client certificate chain, signed by the nodes' client CA.
    pub cert_file: String,
    /// Its private key.
    pub key_file: String,
    /// Server name Envoy asks for and checks the nodes' certificate against.
    pub sni: String,
}

/// Envoy's name of the TLS transport socket.
pub const TLS_SOCKET: &str = "envoy.transport_sockets.tls";

fn file(path: &str) -> core::DataSource {
    core::DataSource {
        specifier: Some(core::data_source::Specifier::Filename(path.to_owned())),
        ..Default::default()
    }
}

/// The TLS context, as an xDS message (for the ext_proc cluster's transport socket).
pub fn tls_context(f: &UpstreamTlsFiles) -> tls::UpstreamTlsContext {
    tls::UpstreamTlsContext {
        sni: f.sni.clone(),
        common_tls_context: Some(tls::CommonTlsContext {
            alpn_protocols: vec!["h2".into()],
            tls_certificates: vec![tls::TlsCertificate {
                certificate_chain: Some(file(&f.cert_file)),
                private_key: Some(file(&f.key_file)),
                ..Default::default()
            }],
            validation_context_type: Some(
                tls::common_tls_context::ValidationContextType::ValidationContext(
                    tls::CertificateValidationContext {
                        trusted_ca: Some(file(&f.ca_file)),
                        ..Default::default()
                    },
                ),
            ),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The same transport socket as bootstrap JSON (for the ADS cluster).
pub fn transport_socket_json(f: &UpstreamTlsFiles) -> Value {
    json!({
        "name": TLS_SOCKET,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": f.sni,
            "common_tls_context": {
                "alpn_protocols": ["h2"],
                "tls_certificates": [{
                    "certificate_chain": {"filename": f.cert_file},
                    "private_key": {"filename": f.key_file}
                }],
                "validation_context": {"trusted_ca": {"filename": f.ca_file}}
            }
        }
    })
}
