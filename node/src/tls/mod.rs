//! TLS and mTLS on the node's gRPC port (ext_proc, ADS and gRPC health), with GIE's flag
//! names where GIE has one (`--secure-serving`, `--cert-path`, `--enable-cert-reload`) and
//! llm-d's `--tls-min-version` / `--tls-cipher-suites`.
//!
//! - The certificate and key are read from files (`--cert-path` DIR holding `tls.crt` and
//!   `tls.key`, as a Kubernetes TLS Secret mounts them, or `--tls-cert-file` and
//!   `--tls-key-file`).
//! - `--tls-client-ca-file` turns on mTLS: a client must present a certificate that chains
//!   to that CA and is within its validity period; plaintext, unknown-CA and expired
//!   clients are refused during the handshake.
//! - With `--enable-cert-reload` the files are re-read every second; a changed, valid set
//!   takes effect for new connections at once, open connections keep theirs, and an
//!   invalid set is logged and ignored (the old one stays).
//!
//! Unlike GIE, serving stays plaintext unless TLS is asked for: the Envoy bootstraps in
//! `deploy/envoy/` speak plaintext to the tier unless they are the `-mtls` ones.
//!
//! The admin API (`--admin-tls-*`) and the proxy's client side (`--proxy-tls-*`) take their
//! own certificate, key and optional client CA, and share the version, suite and reload
//! flags. They offer HTTP/2 and HTTP/1.1.

use std::path::PathBuf;

use clap::Args;

mod config;
mod incoming;

pub use config::{
    Alpn, ServerTlsSettings, TlsConfigError, TlsVersion, parse_cipher_suites,
    self_signed_server_config,
};
pub use incoming::{TlsIncoming, TlsListener, TlsReloader};

/// `infermesh serve` TLS flags.
#[derive(Debug, Clone, Args)]
pub struct TlsArgs {
    /// Serve the gRPC port (ext_proc, ADS, health) over TLS (GIE's flag; implied by any
    /// certificate flag).
    #[arg(long)]
    pub secure_serving: bool,
    /// Directory holding `tls.crt` and `tls.key` (GIE's flag; a mounted TLS Secret).
    #[arg(long, conflicts_with_all = ["tls_cert_file", "tls_key_file"])]
    pub cert_path: Option<PathBuf>,
    /// The server certificate chain (PEM).
    #[arg(long, requires = "tls_key_file")]
    pub tls_cert_file: Option<PathBuf>,
    /// The server private key (PEM).
    #[arg(long, requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,
    /// CA bundle (PEM) client certificates must chain to: turns on mTLS.
    #[arg(long)]
    pub tls_client_ca_file: Option<PathBuf>,
    /// Re-read the certificate, key and client CA every second and use a changed set for
    /// new connections (GIE's flag).
    #[arg(long)]
    pub enable_cert_reload: bool,
    /// Lowest TLS version accepted: 1.2 (default) or 1.3 (`VersionTLS12`/`VersionTLS13`
    /// also read).
    #[arg(long)]
    pub tls_min_version: Option<String>,
    /// TLS 1.2 cipher suites allowed, by IANA name, comma-separated (TLS 1.3 suites are
    /// always on, as in Go); default: every suite rustls offers.
    #[arg(long, value_delimiter = ',')]
    pub tls_cipher_suites: Vec<String>,
    /// Serve the admin API over TLS with this certificate chain (PEM).
    #[arg(long, requires = "admin_tls_key_file")]
    pub admin_tls_cert_file: Option<PathBuf>,
    /// The admin API's private key (PEM).
    #[arg(long, requires = "admin_tls_cert_file")]
    pub admin_tls_key_file: Option<PathBuf>,
    /// CA bundle (PEM) admin clients' certificates must chain to: mTLS on the admin API.
    #[arg(long, requires = "admin_tls_cert_file")]
    pub admin_tls_client_ca_file: Option<PathBuf>,
    /// CA bundle (PEM) this node trusts for other nodes' admin APIs (forwarding to the
    /// leader, --join over https); default: --admin-tls-client-ca-file, else the
    /// platform's roots.
    #[arg(long)]
    pub admin_tls_ca_file: Option<PathBuf>,
    /// Serve the proxy (--proxy-addr) over TLS with this certificate chain (PEM).
    #[arg(long, requires = "proxy_tls_key_file")]
    pub proxy_tls_cert_file: Option<PathBuf>,
    /// The proxy's private key (PEM).
    #[arg(long, requires = "proxy_tls_cert_file")]
    pub proxy_tls_key_file: Option<PathBuf>,
    /// CA bundle (PEM) proxy clients' certificates must chain to: mTLS on the proxy.
    #[arg(long, requires = "proxy_tls_cert_file")]
    pub proxy_tls_client_ca_file: Option<PathBuf>,
}

impl TlsArgs {
    /// The gRPC port's settings these flags describe; `Ok(None)` = plaintext.
    pub fn settings(&self) -> Result<Option<ServerTlsSettings>, TlsConfigError> {
        let (cert, key) = match (&self.cert_path, &self.tls_cert_file, &self.tls_key_file) {
            (Some(dir), _, _) => (dir.join("tls.crt"), dir.join("tls.key")),
            (None, Some(c), Some(k)) => (c.clone(), k.clone()),
            _ => {
                let shared_only = self.enable_cert_reload
                    || self.tls_min_version.is_some()
                    || !self.tls_cipher_suites.is_empty();
                let other_port =
                    self.admin_tls_cert_file.is_some() || self.proxy_tls_cert_file.is_some();
                if self.secure_serving
                    || self.tls_client_ca_file.is_some()
                    || (shared_only && !other_port)
                {
                    return Err(TlsConfigError::Flag {
                        flag: "cert-path",
                        reason: "TLS flags need a certificate: --cert-path DIR, or --tls-cert-file with --tls-key-file".into(),
                    });
                }
                return Ok(None);
            }
        };
        self.build(cert, key, self.tls_client_ca_file.clone(), Alpn::Grpc)
            .map(Some)
    }

    /// The admin API's settings (`--admin-tls-*`); `Ok(None)` = plaintext.
    pub fn admin_settings(&self) -> Result<Option<ServerTlsSettings>, TlsConfigError> {
        match (&self.admin_tls_cert_file, &self.admin_tls_key_file) {
            (Some(c), Some(k)) => self
                .build(
                    c.clone(),
                    k.clone(),
                    self.admin_tls_client_ca_file.clone(),
                    Alpn::Http,
                )
                .map(Some),
            _ => Ok(None),
        }
    }

    /// The proxy's settings (`--proxy-tls-*`); `Ok(None)` = plaintext.
    pub fn proxy_settings(&self) -> Result<Option<ServerTlsSettings>, TlsConfigError> {
        match (&self.proxy_tls_cert_file, &self.proxy_tls_key_file) {
            (Some(c), Some(k)) => self
                .build(
                    c.clone(),
                    k.clone(),
                    self.proxy_tls_client_ca_file.clone(),
                    Alpn::Http,
                )
                .map(Some),
            _ => Ok(None),
        }
    }

    /// What this node presents and trusts when it calls another node's admin API.
    pub fn admin_peer(&self) -> crate::admin::client::AdminTls {
        crate::admin::client::AdminTls {
            ca_file: self
                .admin_tls_ca_file
                .clone()
                .or_else(|| self.admin_tls_client_ca_file.clone()),
            cert_file: self.admin_tls_cert_file.clone(),
            key_file: self.admin_tls_key_file.clone(),
        }
    }

    fn build(
        &self,
        cert: PathBuf,
        key: PathBuf,
        client_ca: Option<PathBuf>,
        alpn: Alpn,
    ) -> Result<ServerTlsSettings, TlsConfigError> {
        let min_version = match &self.tls_min_version {
            Some(v) => TlsVersion::parse(v)?,
            None => TlsVersion::Tls12,
        };
        let cipher_suites = parse_cipher_suites(&self.tls_cipher_suites)?;
        let settings = ServerTlsSettings {
            cert,
            key,
            client_ca,
            min_version,
            cipher_suites,
            reload: self.enable_cert_reload,
            alpn,
        };
        // Fail at start, naming the file, rather than at the first handshake.
        settings.load()?;
        Ok(settings)
    }
}
