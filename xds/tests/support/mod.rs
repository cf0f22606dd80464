//! Test support: isolated "nodes" (own runtime, killable), a tiny ext_proc picker, test
//! HTTP backends. Envoy, waits and loopback helpers come from `infermesh-testkit`.
//! Everything on 127.0.0.1:0.

#![allow(dead_code)]

use std::net::SocketAddr;

use infermesh_testkit::Isolated;
use infermesh_testkit::extproc::MinimalProcessor;
use infermesh_xds::{XdsConfig, XdsServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

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

/// A picker (the testkit's minimal processor + gRPC health) on its own killable runtime:
/// it sends every request to `backend`, naming itself and the pool in `x-picked-by`.
pub struct PickerNode {
    pub addr: SocketAddr,
    rt: Isolated,
}

impl PickerNode {
    pub async fn start(name: &str, backend: SocketAddr) -> Self {
        let rt = Isolated::new();
        let picker = MinimalProcessor::new(&[backend]).tagged(name);
        let addr = rt
            .run(async move {
                let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
                let addr = listener.local_addr().expect("addr");
                tokio::spawn(async move { picker.serve(listener).await.expect("picker serve") });
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
