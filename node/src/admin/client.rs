//! A small client of the admin API (used by the CLI, tests and the policy benchmark).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Full};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::Value;

use crate::upstream::{HttpClient, HttpsClient, http_client, https_client_with};

/// TLS towards an admin API: the CA bundle to trust (default: the platform's roots) and,
/// for an mTLS admin API, the client certificate and key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdminTls {
    /// CA bundle (PEM) the server's certificate must chain to.
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain (PEM), presented when the server asks for one.
    pub cert_file: Option<PathBuf>,
    /// Client private key (PEM).
    pub key_file: Option<PathBuf>,
}

fn tls_error(path: &Path, reason: impl std::fmt::Display) -> String {
    format!("{}: {reason}", path.display())
}

impl AdminTls {
    /// The rustls client config these files describe (read now, so a changed file is
    /// picked up by the next client built).
    pub fn client_config(&self) -> Result<rustls::ClientConfig, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let mut roots = rustls::RootCertStore::empty();
        match &self.ca_file {
            Some(path) => {
                for c in CertificateDer::pem_file_iter(path).map_err(|e| tls_error(path, e))? {
                    roots
                        .add(c.map_err(|e| tls_error(path, e))?)
                        .map_err(|e| tls_error(path, e))?;
                }
                if roots.is_empty() {
                    return Err(tls_error(path, "holds no CA certificate"));
                }
            }
            None => {
                roots = crate::upstream::native_roots().map_err(|e| {
                    format!("no CA to trust: pass a CA file (the platform's store is empty: {e})")
                })?;
            }
        }
        let builder = builder.with_root_certificates(roots);
        match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => {
                let chain = CertificateDer::pem_file_iter(cert)
                    .map_err(|e| tls_error(cert, e))?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| tls_error(cert, e))?;
                let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| tls_error(key, e))?;
                builder
                    .with_client_auth_cert(chain, key_der)
                    .map_err(|e| tls_error(cert, e))
            }
            (None, None) => Ok(builder.with_no_client_auth()),
            _ => Err("a client certificate needs both its certificate and key files".into()),
        }
    }
}

/// How admin calls travel: plain HTTP, or HTTPS with the caller's TLS settings.
#[derive(Debug, Clone)]
pub(crate) enum Transport {
    /// `http://` servers.
    Plain(HttpClient),
    /// `https://` servers.
    Tls(HttpsClient),
}

impl Transport {
    /// The transport for a server with this URL scheme.
    pub(crate) fn for_scheme(
        scheme: &str,
        tls: &AdminTls,
        connect_timeout: Duration,
    ) -> Result<Transport, String> {
        match scheme {
            "https" => Ok(Transport::Tls(https_client_with(
                tls.client_config()?,
                connect_timeout,
            ))),
            _ => Ok(Transport::Plain(http_client(connect_timeout))),
        }
    }

    /// Sends one request.
    pub(crate) async fn request(
        &self,
        req: http::Request<Full<Bytes>>,
    ) -> Result<http::Response<hyper::body::Incoming>, hyper_util::client::legacy::Error> {
        match self {
            Transport::Plain(c) => c.request(req).await,
            Transport::Tls(c) => c.request(req).await,
        }
    }
}

/// An admin API call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// `--server` is not a usable URL.
    #[error("--server {server:?}: {reason}")]
    BadServer {
        /// What was given.
        server: String,
        /// Why it is unusable.
        reason: String,
    },
    /// The node could not be reached or the exchange broke off.
    #[error("cannot reach the admin API at {server}: {reason}")]
    Unreachable {
        /// The server.
        server: String,
        /// Why.
        reason: String,
    },
    /// The node answered with an error.
    #[error("{status}: {message}")]
    Api {
        /// HTTP status.
        status: StatusCode,
        /// The error message.
        message: String,
        /// The whole error body.
        body: Value,
    },
}

impl ClientError {
    /// The HTTP status when the node answered with an error.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Calls one node's admin API.
#[derive(Debug, Clone)]
pub struct AdminClient {
    base: String,
    token: Option<String>,
    client: Transport,
    timeout: Duration,
}

impl AdminClient {
    /// A client of the admin API at `server` (`http://host:port` or `host:port`, or
    /// `https://host:port` trusting the platform's roots), sending `token` as a bearer
    /// token when given.
    pub fn new(server: &str, token: Option<String>) -> Result<AdminClient, ClientError> {
        AdminClient::with_tls(server, token, &AdminTls::default())
    }

    /// A client of the admin API at `server`, speaking TLS as `tls` says when the URL is
    /// `https://`.
    pub fn with_tls(
        server: &str,
        token: Option<String>,
        tls: &AdminTls,
    ) -> Result<AdminClient, ClientError> {
        let base = if server.contains("://") {
            server.trim_end_matches('/').to_owned()
        } else {
            format!("http://{}", server.trim_end_matches('/'))
        };
        let uri: http::Uri =
            base.parse()
                .map_err(|e: http::uri::InvalidUri| ClientError::BadServer {
                    server: server.to_owned(),
                    reason: e.to_string(),
                })?;
        let scheme = uri.scheme_str().unwrap_or_default();
        if !matches!(scheme, "http" | "https") || uri.authority().is_none() {
            return Err(ClientError::BadServer {
                server: server.to_owned(),
                reason: "expected http://HOST:PORT or https://HOST:PORT".into(),
            });
        }
        let client =
            Transport::for_scheme(scheme, tls, Duration::from_secs(2)).map_err(|reason| {
                ClientError::BadServer {
                    server: server.to_owned(),
                    reason,
                }
            })?;
        Ok(AdminClient {
            base,
            token,
            client,
            timeout: Duration::from_secs(60),
        })
    }

    /// The server's base URL.
    pub fn server(&self) -> &str {
        &self.base
    }

    /// Sends one request; a 2xx answer's JSON body is returned, anything else is an error.
    pub async fn call(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Value, ClientError> {
        let unreachable = |reason: String| ClientError::Unreachable {
            server: self.base.clone(),
            reason,
        };
        let mut req = http::Request::builder()
            .method(method)
            .uri(format!("{}{}", self.base, path_and_query));
        if let Some(t) = &self.token {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        if body.is_some() {
            req = req.header(http::header::CONTENT_TYPE, "application/yaml");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| unreachable(e.to_string()))?;
        let resp = tokio::time::timeout(self.timeout, self.client.request(req))
            .await
            .map_err(|_| unreachable(format!("no answer within {:?}", self.timeout)))?
            .map_err(|e| unreachable(format!("{e}")))?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| unreachable(e.to_string()))?
            .to_bytes();
        let value: Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        if status.is_success() {
            return Ok(value);
        }
        let message = value
            .pointer("/error/message")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_else(|| value.to_string());
        Err(ClientError::Api {
            status,
            message,
            body: value,
        })
    }
}
