//! Loopback plumbing: free ports, a raw HTTP/1.1 GET, condition waits, the workspace root.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A TCP port that was free on 127.0.0.1 a moment ago, for listeners Envoy binds (Envoy
/// needs a number in its config). It is drawn at random from below the kernel's ephemeral
/// range: the kernel hands ports from that range to every `bind(0)` and outgoing
/// connection, so one taken from it could be given to something else in the test before
/// Envoy binds it.
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let low = 10_000u16.min(ephemeral_low / 2);
    let span = u64::from(ephemeral_low.saturating_sub(low).max(1));
    for _ in 0..1000 {
        let random = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        let port = low + (random % span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// The workspace root (where `.venv-test` and `deploy/` live).
pub fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit/ has a parent")
        .to_path_buf()
}

/// How often the wait helpers poll: conditions, not fixed delays, end every wait.
const POLL: Duration = Duration::from_millis(10);

/// Polls `f` until it returns `Some`, or panics after `timeout` naming `what`. The one wait
/// helper of the workspace's tests ([`wait_until`] and [`wait_until_async`] wrap it).
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
        tokio::time::sleep(POLL).await;
    }
}

/// Polls `cond` until it holds, or panics after `timeout` naming `what`.
pub async fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    wait_for(what, timeout, || std::future::ready(cond().then_some(()))).await
}

/// [`wait_until`] for an asynchronous condition.
pub async fn wait_until_async<F, Fut>(what: &str, timeout: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_for(what, timeout, || {
        let fut = cond();
        async move { fut.await.then_some(()) }
    })
    .await
}

/// One HTTP/1.1 GET over a fresh connection (5 s limit); returns status and body.
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

/// A blocking GET, for diagnostics printed from `Drop` (no runtime there).
pub(crate) fn blocking_get(addr: SocketAddr, path: &str) -> String {
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
