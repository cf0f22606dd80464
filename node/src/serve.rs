//! Serving an axum app on a listener until the node (or sidecar) shuts down: one place for
//! the graceful-shutdown wiring every HTTP listener shares.

use tokio::sync::watch;
use tokio::task::JoinSet;

/// Serves `app` on `listener` until shutdown.
pub fn spawn_http<L>(
    tasks: &mut JoinSet<()>,
    what: &'static str,
    listener: L,
    app: axum::Router,
    mut sd: watch::Receiver<bool>,
) where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    tasks.spawn(async move {
        let res = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = sd.wait_for(|s| *s).await;
            })
            .await;
        if let Err(e) = res {
            tracing::error!(error = %e, "{what} server failed");
        }
    });
}
