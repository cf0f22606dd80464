//! Handing a request to a pod's engine, and telling the engine when its client left.

use tokio::sync::mpsc;

use super::PodState;
use super::error::ApiError;
use crate::engine::EngineRequest;
use crate::pod::{Event, Input};

/// Tells the engine to drop a request whose client went away before it finished.
pub(super) struct AbortOnDrop {
    pub(super) id: u64,
    engine: mpsc::UnboundedSender<Input>,
    pub(super) armed: bool,
}

impl AbortOnDrop {
    /// A guard for request `id` that aborts it in `engine` unless disarmed first.
    pub(super) fn new(id: u64, engine: mpsc::UnboundedSender<Input>) -> Self {
        AbortOnDrop {
            id,
            engine,
            armed: true,
        }
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.engine.send(Input::Abort(self.id));
        }
    }
}

/// Submits `req` to `pod`'s engine: its events, and the guard that aborts it when dropped.
pub(super) fn submit(
    pod: &PodState,
    req: EngineRequest,
) -> Result<(mpsc::UnboundedReceiver<Event>, AbortOnDrop), ApiError> {
    let (tx, rx) = mpsc::unbounded_channel();
    let id = req.id;
    pod.engine
        .send(Input::Submit { req, events: tx })
        .map_err(|_| ApiError::unavailable("engine stopped"))?;
    Ok((rx, AbortOnDrop::new(id, pod.engine.clone())))
}
