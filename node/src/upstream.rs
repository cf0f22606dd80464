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
