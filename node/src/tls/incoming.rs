//! The TLS listener: accepts TCP connections, runs each handshake on its own task (so a
//! client that stalls its handshake holds up nobody), and hands finished TLS streams to
//! the gRPC server. The config in force is swapped atomically on reload.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

use super::config::{Material, ServerTlsSettings, TlsConfigError};

/// Longest a client may take to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the files are re-read with `--enable-cert-reload`.
const RELOAD_EVERY: Duration = Duration::from_secs(1);

/// Resolves once `shutdown` turns true (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

/// The server config in force, reloadable.
#[derive(Clone)]
pub struct TlsReloader {
    /// The files, or `None` for a config made in memory (never reloaded).
    settings: Option<ServerTlsSettings>,
    current: Arc<ArcSwap<ServerConfig>>,
}

impl std::fmt::Debug for TlsReloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsReloader")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl TlsReloader {
    /// Loads the files once.
    pub fn new(settings: ServerTlsSettings) -> Result<TlsReloader, TlsConfigError> {
        let cfg = settings.load()?;
        Ok(TlsReloader {
            settings: Some(settings),
            current: Arc::new(ArcSwap::new(cfg)),
        })
    }

    /// A config made in memory, which stays as it is.
    pub fn fixed(cfg: Arc<ServerConfig>) -> TlsReloader {
        TlsReloader {
            settings: None,
            current: Arc::new(ArcSwap::new(cfg)),
        }
    }

    /// Re-reads the files every second while `shutdown` is false, swapping in a changed
    /// set that builds; a set that does not build is logged once and skipped.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let Some(settings) = &self.settings else {
            return;
        };
        let mut last: Option<Material> = settings.read_material().ok();
        let mut failed: Option<Material> = None;
        let mut tick = tokio::time::interval(RELOAD_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stopped(&mut shutdown) => return,
            }
            let m = match settings.read_material() {
                Ok(m) => m,
                // Mid-rotation (a file replaced but not its partner yet): try again.
                Err(e) => {
                    tracing::debug!(error = %e, "TLS files not readable yet");
                    continue;
                }
            };
            if last.as_ref() == Some(&m) || failed.as_ref() == Some(&m) {
                continue;
            }
            match settings.build(&m) {
                Ok(cfg) => {
                    self.current.store(cfg);
                    tracing::info!(cert = %settings.cert.display(), "TLS certificate reloaded");
                    last = Some(m);
                    failed = None;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "new TLS files refused; keeping the ones in force");
                    failed = Some(m);
                }
            }
        }
    }

    /// Whether files are to be watched.
    pub fn reloads(&self) -> bool {
        self.settings.as_ref().is_some_and(|s| s.reload)
    }

    fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.load_full())
    }
}

/// A finished handshake, or why accepting failed.
type Accepted = Result<TlsStream<TcpStream>, std::io::Error>;

/// TLS connections for the gRPC server.
pub struct TlsIncoming;

impl TlsIncoming {
    /// Accepts on `listener` until `shutdown`, handshaking with the config in force.
    pub fn serve(
        listener: TcpListener,
        tls: TlsReloader,
        shutdown: watch::Receiver<bool>,
    ) -> ReceiverStream<Accepted> {
        ReceiverStream::new(accept_loop(listener, tls, shutdown))
    }
}

/// TLS connections for an HTTP server (the admin API, the proxy): the gRPC port's accept
/// loop behind axum's listener interface.
pub struct TlsListener {
    rx: mpsc::Receiver<Accepted>,
    local: std::net::SocketAddr,
}

impl TlsListener {
    /// Accepts on `listener` until `shutdown`, handshaking with the config in force.
    pub fn new(
        listener: TcpListener,
        tls: TlsReloader,
        shutdown: watch::Receiver<bool>,
    ) -> std::io::Result<TlsListener> {
        let local = listener.local_addr()?;
        Ok(TlsListener {
            rx: accept_loop(listener, tls, shutdown),
            local,
        })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.rx.recv().await {
                Some(Ok(stream)) => {
                    let Ok(peer) = stream.get_ref().0.peer_addr() else {
                        continue;
                    };
                    return (stream, peer);
                }
                Some(Err(_)) => continue,
                // The accept loop stopped at shutdown; axum's graceful shutdown ends the
                // server, so there is nothing more to hand out.
                None => std::future::pending().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// Accepts TCP connections and hands on those whose handshake finished.
fn accept_loop(
    listener: TcpListener,
    tls: TlsReloader,
    mut shutdown: watch::Receiver<bool>,
) -> mpsc::Receiver<Accepted> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::debug!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                },
                () = stopped(&mut shutdown) => return,
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = tls.acceptor();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => {
                        tracing::info!(%peer, error = %e, "TLS handshake refused");
                    }
                    Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    rx
}
