//! The scrapers' own thread. Scrapes are many small periodic jobs (2000/s at 100 pods); on
//! the request path's multi-thread runtime each one wakes an idle worker to steal it, which
//! costs more CPU than the scrape itself and puts scrape tasks in the queues requests wait
//! in. One current-thread runtime on a dedicated thread runs them all instead.

use std::io;

use tokio::runtime::{Builder, Handle};
use tokio::sync::oneshot;

/// A current-thread tokio runtime on its own OS thread; dropping it stops the thread and
/// every task spawned on it.
#[derive(Debug)]
pub struct ScrapeRuntime {
    handle: Handle,
    stop: Option<oneshot::Sender<()>>,
}

impl ScrapeRuntime {
    /// Starts the thread (named `infermesh-scrape`).
    pub fn start() -> io::Result<ScrapeRuntime> {
        let rt = Builder::new_current_thread().enable_all().build()?;
        let handle = rt.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("infermesh-scrape".into())
            .spawn(move || {
                // Returns when the sender is sent to or dropped; dropping `rt` here, outside
                // any async context, cancels the scrapers still spawned on it.
                rt.block_on(async {
                    let _ = stopped.await;
                });
            })?;
        Ok(ScrapeRuntime {
            handle,
            stop: Some(stop),
        })
    }

    /// Where scrapers are spawned.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }
}

impl Drop for ScrapeRuntime {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn runs_tasks_on_its_thread_and_stops_them_when_dropped() {
        let rt = ScrapeRuntime::start().unwrap();
        let name = rt
            .handle()
            .spawn(async { std::thread::current().name().map(str::to_owned) })
            .await
            .unwrap();
        assert_eq!(name.as_deref(), Some("infermesh-scrape"));

        let (tx, rx) = oneshot::channel::<()>();
        let forever = rt.handle().spawn(async move {
            let _tx = tx; // dropped when the task is cancelled
            std::future::pending::<()>().await
        });
        drop(rt);
        tokio::time::timeout(Duration::from_secs(5), rx)
            .await
            .expect("the task is cancelled when the runtime stops")
            .expect_err("the task never sends");
        assert!(forever.await.unwrap_err().is_cancelled());
    }
}
