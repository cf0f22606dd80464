//! TLS for mesh QUIC: a cluster CA (WebPKI verification, mutual) or self-signed certificates
//! whose SHA-256 fingerprints are pinned.
//!
//! In self-signed mode each node makes a fresh certificate at start and advertises its
//! fingerprint inside its gossip identity, which the cluster key authenticates. A dialer
//! accepts only the exact certificate the member advertised; an acceptor takes any client
//! certificate in the handshake and then admits the connection only once the certificate's
//! fingerprint belongs to a live member (see `rpc`), so no unauthenticated peer is served.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// ALPN protocol id of the mesh RPC.
pub const ALPN: &[u8] = b"infermesh-mesh/1";
/// Name put in self-signed certificates and used as SNI.
pub const SELF_SIGNED_NAME: &str = "infermesh-mesh";

/// SHA-256 of a DER certificate.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// Fingerprint of a DER-encoded certificate.
    pub fn of(cert_der: &[u8]) -> Fingerprint {
        Fingerprint(Sha256::digest(cert_der).into())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        f.write_str("…")
    }
}

/// How mesh connections are secured.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case", deny_unknown_fields)]
pub enum TlsConfig {
    /// A fresh self-signed certificate per start; fingerprints pinned through gossip.
    #[default]
    SelfSigned,
    /// Certificates issued by a cluster CA; both sides verify the chain (mutual TLS).
    ClusterCa {
        /// PEM file with the CA certificate(s).
        ca_cert: PathBuf,
        /// PEM file with this node's certificate chain.
        cert: PathBuf,
        /// PEM file with this node's private key.
        key: PathBuf,
        /// DNS name every node certificate carries (used as SNI).
        server_name: String,
    },
}

/// TLS material could not be loaded or assembled.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or held no usable item.
    #[error("cannot load {what} from {path}: {reason}")]
    Pem {
        /// Which file (`ca_cert`, `cert`, `key`).
        what: &'static str,
        /// Path given in the config.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Certificate generation failed.
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the configuration.
    #[error("invalid TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// quinn refused the rustls configuration.
    #[error("TLS configuration unusable for QUIC: {0}")]
    Quic(String),
}

/// The node's TLS identity and the verifiers derived from the config.
#[derive(Debug, Clone)]
pub struct TlsIdentity {
    provider: Arc<CryptoProvider>,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    /// Fingerprint of this node's leaf certificate.
    pub fingerprint: Fingerprint,
    ca: Option<(Arc<rustls::RootCertStore>, String)>,
}

impl TlsIdentity {
    /// Loads or generates the node's certificate according to `config`.
    pub fn from_config(config: &TlsConfig) -> Result<TlsIdentity, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        match config {
            TlsConfig::SelfSigned => {
                let ck = rcgen::generate_simple_self_signed(vec![SELF_SIGNED_NAME.to_owned()])?;
                let der = ck.cert.der().clone();
                let key = PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
                Ok(TlsIdentity {
                    provider,
                    fingerprint: Fingerprint::of(&der),
                    chain: vec![der],
                    key: Arc::new(key),
                    ca: None,
                })
            }
            TlsConfig::ClusterCa {
                ca_cert,
                cert,
                key,
                server_name,
            } => {
                let pem_err = |what, path: &PathBuf, reason: String| TlsError::Pem {
                    what,
                    path: path.clone(),
                    reason,
                };
                let mut roots = rustls::RootCertStore::empty();
                let cas = CertificateDer::pem_file_iter(ca_cert)
                    .map_err(|e| pem_err("ca_cert", ca_cert, e.to_string()))?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| pem_err("ca_cert", ca_cert, e.to_string()))?;
                if cas.is_empty() {
                    return Err(pem_err("ca_cert", ca_cert, "no certificate".into()));
                }
                for c in cas {
                    roots
                        .add(c)
                        .map_err(|e| pem_err("ca_cert", ca_cert, e.to_string()))?;
                }
                let chain = CertificateDer::pem_file_iter(cert)
                    .map_err(|e| pem_err("cert", cert, e.to_string()))?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| pem_err("cert", cert, e.to_string()))?;
                let Some(leaf) = chain.first() else {
                    return Err(pem_err("cert", cert, "no certificate".into()));
                };
                let fingerprint = Fingerprint::of(leaf);
                let pk = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| pem_err("key", key, e.to_string()))?;
                Ok(TlsIdentity {
                    provider,
                    chain,
                    key: Arc::new(pk),
                    fingerprint,
                    ca: Some((Arc::new(roots), server_name.clone())),
                })
            }
        }
    }

    /// Whether peers are verified by the cluster CA (fingerprint checks then not needed).
    pub fn uses_ca(&self) -> bool {
        self.ca.is_some()
    }

    /// QUIC server configuration (requires a client certificate).
    pub fn server_config(&self) -> Result<quinn::ServerConfig, TlsError> {
        let builder = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?;
        let verifier: Arc<dyn ClientCertVerifier> = match &self.ca {
            Some((roots, _)) => rustls::server::WebPkiClientVerifier::builder_with_provider(
                roots.clone(),
                self.provider.clone(),
            )
            .build()
            .map_err(|e| TlsError::Quic(e.to_string()))?,
            None => Arc::new(AnyClientCert {
                provider: self.provider.clone(),
            }),
        };
        let mut cfg = builder
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        let q = quinn::crypto::rustls::QuicServerConfig::try_from(cfg)
            .map_err(|e| TlsError::Quic(e.to_string()))?;
        Ok(quinn::ServerConfig::with_crypto(Arc::new(q)))
    }

    /// QUIC client configuration for dialing a peer that advertised `expected`, and the SNI.
    pub fn client_config(
        &self,
        expected: Fingerprint,
    ) -> Result<(quinn::ClientConfig, String), TlsError> {
        let builder = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?;
        let (builder, name) = match &self.ca {
            Some((roots, name)) => (builder.with_root_certificates(roots.clone()), name.clone()),
            None => (
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(PinnedServerCert {
                        expected,
                        provider: self.provider.clone(),
                    })),
                SELF_SIGNED_NAME.to_owned(),
            ),
        };
        let mut cfg = builder.with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        let q = quinn::crypto::rustls::QuicClientConfig::try_from(cfg)
            .map_err(|e| TlsError::Quic(e.to_string()))?;
        Ok((quinn::ClientConfig::new(Arc::new(q)), name))
    }
}

/// Accepts exactly the server certificate whose SHA-256 is `expected`.
#[derive(Debug)]
struct PinnedServerCert {
    expected: Fingerprint,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedServerCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if Fingerprint::of(end_entity) == self.expected {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Requires a client certificate and its handshake signature; membership admission follows.
#[derive(Debug)]
struct AnyClientCert {
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for AnyClientCert {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // Identity is checked after the handshake against the gossip-advertised fingerprints.
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Fingerprint of the leaf certificate a QUIC peer presented, if any.
pub fn peer_fingerprint(conn: &quinn::Connection) -> Option<Fingerprint> {
    let any = conn.peer_identity()?;
    let certs = any.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    certs.first().map(|c| Fingerprint::of(c))
}
