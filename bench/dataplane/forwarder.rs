//! The standalone proxy's limit, as a baseline for `bench/dataplane`: a forwarder that does
//! nothing a router does — it reads the request body, forwards it round-robin over pooled
//! connections (the same hyper client settings as infermesh's proxy) and streams the answer
//! back. Its requests/s on the same pods in the same run is the ceiling the proxy is held to.
//!
//!   forwarder --listen 127.0.0.1:9100 --pods 127.0.0.1:8000,127.0.0.1:8001

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

#[derive(Debug, Parser)]
struct Args {
    /// HTTP listen address.
    #[arg(long)]
    listen: SocketAddr,
    /// Pods to forward to, round-robin (comma-separated ip:port).
    #[arg(long, value_delimiter = ',', required = true)]
    pods: Vec<SocketAddr>,
}

type Upstream = Client<HttpConnector, Full<Bytes>>;

struct Forwarder {
    client: Upstream,
    pods: Vec<SocketAddr>,
    next: AtomicUsize,
}

impl Forwarder {
    async fn forward(
        &self,
        req: hyper::Request<Incoming>,
    ) -> Result<hyper::Response<Incoming>, String> {
        let (parts, body) = req.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        let pod = self.pods[self.next.fetch_add(1, Ordering::Relaxed) % self.pods.len()];
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let mut up = hyper::Request::builder()
            .method(parts.method)
            .uri(format!("http://{pod}{path}"));
        for (k, v) in &parts.headers {
            if k != hyper::header::HOST && k != hyper::header::CONTENT_LENGTH {
                up = up.header(k, v);
            }
        }
        let up = up.body(Full::new(body)).map_err(|e| e.to_string())?;
        self.client.request(up).await.map_err(|e| e.to_string())
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(256)
        .build(connector);
    let fwd = Arc::new(Forwarder {
        client,
        pods: args.pods,
        next: AtomicUsize::new(0),
    });
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let listener = tokio::net::TcpListener::bind(args.listen).await?;
            loop {
                let (tcp, _) = listener.accept().await?;
                let _ = tcp.set_nodelay(true);
                let fwd = fwd.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let fwd = fwd.clone();
                        async move { fwd.forward(req).await }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        })
}
