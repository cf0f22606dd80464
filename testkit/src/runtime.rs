//! Tokio runtimes for tests: one to drive a test, and killable ones that stand in for a
//! crashed process.

use std::future::Future;

use tokio::sync::oneshot;

/// Runs `fut` to completion on a fresh two-worker multi-thread runtime (the end-to-end
/// tests' driver: the "nodes" they start run on their own [`Isolated`] runtimes).
pub fn block_on<F: Future>(fut: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("test runtime")
        .block_on(fut)
}

/// A one-worker tokio runtime that can be killed outright, taking every task and socket
/// with it, like a crashed process.
pub struct Isolated {
    rt: Option<tokio::runtime::Runtime>,
}

impl Default for Isolated {
    fn default() -> Self {
        Self::new()
    }
}

impl Isolated {
    /// A fresh runtime.
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

    /// Spawns `fut` on this runtime.
    pub fn spawn(&self, fut: impl Future<Output = ()> + Send + 'static) {
        self.rt.as_ref().expect("alive").spawn(fut);
    }

    /// Kills every task and connection of this runtime (idempotent).
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
