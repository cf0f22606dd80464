//! The pooled HTTP/1 client the node uses to reach model servers (scrapes and proxying).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// A keep-alive connection pool to model servers.
pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// Builds the shared client: no Nagle delay, bounded connect time, idle connections kept.
pub fn http_client(connect_timeout: Duration) -> HttpClient {
    pooled_client(connect_timeout)
}

/// The same pooled client for any request body type (the sidecar streams client bodies).
pub fn pooled_client<B>(connect_timeout: Duration) -> Client<HttpConnector, B>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
{
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(connect_timeout));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(256)
        .build(connector)
}

/// A pooled client that speaks HTTPS (and plain HTTP) to model servers.
pub type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Why the HTTPS client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum PodTlsError {
    /// The platform's trust store could not be read.
    #[error("cannot load the platform's CA certificates: {0}")]
    Roots(String),
}

/// An HTTPS client for pods: verifying their certificates against the platform's roots,
/// or, with `insecure_skip_verify` (llm-d's default for `metrics-data-source`), accepting
/// any certificate — pods usually serve self-signed ones — while still encrypting.
pub fn https_client(
    connect_timeout: Duration,
    insecure_skip_verify: bool,
) -> Result<HttpsClient, PodTlsError> {
    Ok(https_client_with(
        pod_tls_config(insecure_skip_verify)?,
        connect_timeout,
    ))
}

/// The client TLS config for pods: the platform's roots, or any certificate with
/// `insecure_skip_verify`.
pub fn pod_tls_config(insecure_skip_verify: bool) -> Result<rustls::ClientConfig, PodTlsError> {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports the default versions");
    let tls = if insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(std::sync::Arc::new(AnyServerCert(provider)))
            .with_no_client_auth()
    } else {
        builder
            .with_root_certificates(native_roots().map_err(PodTlsError::Roots)?)
            .with_no_client_auth()
    };
    Ok(tls)
}

/// The platform's trusted CA certificates (the system bundle); an error names why none
/// could be read.
pub fn native_roots() -> Result<rustls::RootCertStore, String> {
    let found = rustls_native_certs::load_native_certs();
    if found.certs.is_empty() {
        return Err(format!("{:?}", found.errors));
    }
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(found.certs);
    Ok(roots)
}

/// A pooled HTTPS (and plain HTTP) client speaking TLS as `tls` says, for any request body
/// type (the sidecar streams client bodies).
pub fn https_client_with<B>(
    tls: rustls::ClientConfig,
    connect_timeout: Duration,
) -> Client<hyper_rustls::HttpsConnector<HttpConnector>, B>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
{
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    http.enforce_http(false);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(256)
        .build(connector)
}

/// `insecureSkipVerify`: any server certificate is accepted (the handshake signatures are
/// still checked, so the connection is encrypted to whoever holds the presented key).
#[derive(Debug)]
struct AnyServerCert(std::sync::Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
