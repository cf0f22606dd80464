//! Building the rustls server config from the TLS files and flags.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, SupportedCipherSuite};

/// A TLS setting that cannot be used; nothing was started (or, on reload, nothing changed).
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    /// A flag has an unusable value.
    #[error("--{flag}: {reason}")]
    Flag {
        /// Flag name.
        flag: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A file could not be read.
    #[error("{}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The IO error.
        source: std::io::Error,
    },
    /// A file does not hold what it should.
    #[error("{}: {reason}", path.display())]
    Content {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the combination (e.g. a key that does not match the certificate).
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client CA cannot verify anything.
    #[error("--tls-client-ca-file: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// A self-signed certificate could not be made.
    #[error("making a self-signed certificate: {0}")]
    SelfSigned(#[from] rcgen::Error),
}

/// A server config with a certificate made now and signed by itself (llm-d's sidecar does
/// the same when it is to serve TLS and has no certificate): encrypted, vouched for by
/// nobody, offering HTTP/2 and HTTP/1.1.
pub fn self_signed_server_config(names: Vec<String>) -> Result<Arc<ServerConfig>, TlsConfigError> {
    let ck = rcgen::generate_simple_self_signed(names)?;
    let key = PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
    let mut cfg = ServerConfig::builder_with_provider(Arc::new(provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![ck.cert.der().clone()], key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The lowest TLS version a server accepts (rustls speaks only 1.2 and 1.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsVersion {
    /// TLS 1.2 and 1.3.
    Tls12,
    /// TLS 1.3 only.
    Tls13,
}

impl TlsVersion {
    /// Reads `1.2`/`1.3` or Go's `VersionTLS12`/`VersionTLS13`.
    pub fn parse(s: &str) -> Result<TlsVersion, TlsConfigError> {
        match s.trim() {
            "1.2" | "VersionTLS12" => Ok(TlsVersion::Tls12),
            "1.3" | "VersionTLS13" => Ok(TlsVersion::Tls13),
            "1.0" | "1.1" | "VersionTLS10" | "VersionTLS11" => Err(TlsConfigError::Flag {
                flag: "tls-min-version",
                reason: format!("{s:?}: TLS below 1.2 is not offered"),
            }),
            _ => Err(TlsConfigError::Flag {
                flag: "tls-min-version",
                reason: format!("{s:?}: expected 1.2 or 1.3 (or VersionTLS12, VersionTLS13)"),
            }),
        }
    }
}

fn provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}

fn is_tls13(s: &SupportedCipherSuite) -> bool {
    matches!(s, SupportedCipherSuite::Tls13(_))
}

/// The TLS 1.2 suites named (IANA names; Go's spellings without `_SHA256` on the ChaCha20
/// suites also read). TLS 1.3 suite names are accepted and ignored: as in Go, TLS 1.3
/// suites are not configurable. Empty = every TLS 1.2 suite offered.
pub fn parse_cipher_suites(names: &[String]) -> Result<Vec<SupportedCipherSuite>, TlsConfigError> {
    let all = provider().cipher_suites;
    let mut out = Vec::new();
    for raw in names {
        let name = raw.trim();
        if name.is_empty() {
            continue;
        }
        let found = all.iter().find(|s| {
            let rustls_name = format!("{:?}", s.suite());
            rustls_name == name
                || rustls_name
                    .strip_prefix("TLS13_")
                    .map(|r| format!("TLS_{r}"))
                    .as_deref()
                    == Some(name)
                || rustls_name
                    .strip_suffix("_SHA256")
                    .is_some_and(|r| r.ends_with("CHACHA20_POLY1305") && r == name && !is_tls13(s))
        });
        match found {
            Some(s) if is_tls13(s) => {}
            Some(s) => {
                if !out
                    .iter()
                    .any(|o: &SupportedCipherSuite| o.suite() == s.suite())
                {
                    out.push(*s);
                }
            }
            None => {
                let known: Vec<String> = all
                    .iter()
                    .filter(|s| !is_tls13(s))
                    .map(|s| format!("{:?}", s.suite()))
                    .collect();
                return Err(TlsConfigError::Flag {
                    flag: "tls-cipher-suites",
                    reason: format!("{name:?} is not offered; choose from {}", known.join(", ")),
                });
            }
        }
    }
    Ok(out)
}

/// Which application protocols a TLS listener offers (ALPN).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    /// HTTP/2 only: the gRPC port.
    Grpc,
    /// HTTP/2 and HTTP/1.1: the admin API and the proxy.
    Http,
}

/// Where the server's TLS material lives and how it is used.
#[derive(Debug, Clone)]
pub struct ServerTlsSettings {
    /// Certificate chain (PEM).
    pub cert: PathBuf,
    /// Private key (PEM).
    pub key: PathBuf,
    /// Client CA bundle (PEM): mTLS when set.
    pub client_ca: Option<PathBuf>,
    /// Lowest version accepted.
    pub min_version: TlsVersion,
    /// TLS 1.2 suites allowed (empty = all).
    pub cipher_suites: Vec<SupportedCipherSuite>,
    /// Re-read the files every second.
    pub reload: bool,
    /// The protocols offered.
    pub alpn: Alpn,
}

fn read(path: &Path) -> Result<Vec<u8>, TlsConfigError> {
    std::fs::read(path).map_err(|source| TlsConfigError::Read {
        path: path.to_owned(),
        source,
    })
}

fn certs(path: &Path, bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsConfigError::Content {
            path: path.to_owned(),
            reason: format!("not PEM certificates: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsConfigError::Content {
            path: path.to_owned(),
            reason: "holds no certificate".into(),
        });
    }
    Ok(certs)
}

/// The files' contents, compared on reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Material {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

impl ServerTlsSettings {
    pub(crate) fn read_material(&self) -> Result<Material, TlsConfigError> {
        Ok(Material {
            cert: read(&self.cert)?,
            key: read(&self.key)?,
            client_ca: self.client_ca.as_deref().map(read).transpose()?,
        })
    }

    /// Reads the files and builds the server config.
    pub fn load(&self) -> Result<Arc<ServerConfig>, TlsConfigError> {
        self.build(&self.read_material()?)
    }

    pub(crate) fn build(&self, m: &Material) -> Result<Arc<ServerConfig>, TlsConfigError> {
        let chain = certs(&self.cert, &m.cert)?;
        let key = PrivateKeyDer::from_pem_slice(&m.key).map_err(|e| TlsConfigError::Content {
            path: self.key.clone(),
            reason: format!("no usable PEM private key: {e}"),
        })?;
        let mut provider = provider();
        if !self.cipher_suites.is_empty() {
            let allowed = &self.cipher_suites;
            provider
                .cipher_suites
                .retain(|s| is_tls13(s) || allowed.iter().any(|a| a.suite() == s.suite()));
        }
        let provider = Arc::new(provider);
        let versions: &[&rustls::SupportedProtocolVersion] = match self.min_version {
            TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
            TlsVersion::Tls13 => &[&rustls::version::TLS13],
        };
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)?;
        let builder = match (&self.client_ca, &m.client_ca) {
            (Some(path), Some(bytes)) => {
                let mut roots = RootCertStore::empty();
                for c in certs(path, bytes)? {
                    roots.add(c).map_err(|e| TlsConfigError::Content {
                        path: path.clone(),
                        reason: format!("not a usable CA certificate: {e}"),
                    })?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()?;
                builder.with_client_cert_verifier(verifier)
            }
            _ => builder.with_no_client_auth(),
        };
        let mut cfg = builder.with_single_cert(chain, key)?;
        cfg.alpn_protocols = match self.alpn {
            Alpn::Grpc => vec![b"h2".to_vec()],
            Alpn::Http => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        };
        Ok(Arc::new(cfg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_and_suites_are_read_in_both_spellings() {
        assert_eq!(TlsVersion::parse("1.3").unwrap(), TlsVersion::Tls13);
        assert_eq!(
            TlsVersion::parse("VersionTLS12").unwrap(),
            TlsVersion::Tls12
        );
        assert!(
            TlsVersion::parse("1.1")
                .unwrap_err()
                .to_string()
                .contains("below 1.2")
        );
        assert!(TlsVersion::parse("tls1.2").is_err());

        let s = parse_cipher_suites(&[
            "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256".into(),
            "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305".into(),
            "TLS_AES_128_GCM_SHA256".into(),
        ])
        .unwrap();
        assert_eq!(
            s.len(),
            2,
            "the TLS 1.3 name is accepted and not configured"
        );
        let err = parse_cipher_suites(&["TLS_RSA_WITH_AES_128_CBC_SHA".into()]).unwrap_err();
        assert!(
            err.to_string().contains("TLS_RSA_WITH_AES_128_CBC_SHA"),
            "{err}"
        );
        assert!(parse_cipher_suites(&[]).unwrap().is_empty());
    }
}
