//! The response body passed from a model server to the client: frames go through as they
//! arrive (SSE is never buffered), usage is read on the way, the client's model name is
//! restored after a rewrite, and the request's [`Ticket`] is settled when the body ends,
//! fails, or is dropped.

use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::metrics::Outcome;
use crate::request::Ticket;
use crate::restore::ModelRestorer;
use crate::usage::UsageScanner;
use tokio_util::sync::WaitForCancellationFutureOwned;

/// The error a body ends with.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A frame read from the upstream body.
pub type UpstreamFrame = Result<Frame<Bytes>, hyper::Error>;

/// An upstream body that settles its request when it ends.
pub struct TrackedBody {
    inner: Incoming,
    /// A frame already read from `inner` (the proxy waited for it before answering), passed
    /// on first.
    first: Option<UpstreamFrame>,
    /// In-flight eviction: when it resolves the response is cut off.
    revoked: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    ticket: Option<Ticket>,
    usage: Option<UsageScanner>,
    served: SocketAddr,
    success: bool,
    restore: Option<ModelRestorer>,
}

impl std::fmt::Debug for TrackedBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrackedBody")
            .field("served", &self.served)
            .field("settled", &self.ticket.is_none())
            .finish_non_exhaustive()
    }
}

impl TrackedBody {
    /// Wraps `inner`, whose frame `first` was already read (if any); `success` says whether
    /// the upstream status was 2xx.
    pub fn new(
        inner: Incoming,
        first: Option<UpstreamFrame>,
        ticket: Ticket,
        content_type: Option<&str>,
        served: SocketAddr,
        success: bool,
    ) -> TrackedBody {
        let restore = ticket
            .model_restore()
            .map(|(served, client)| ModelRestorer::new(served, client));
        let revoked = ticket.revoked().map(Box::pin);
        let mut body = TrackedBody {
            inner,
            first,
            revoked,
            ticket: Some(ticket),
            usage: Some(UsageScanner::new(content_type)),
            served,
            success,
            restore,
        };
        if body.first.is_none() && body.inner.is_end_stream() {
            body.settle_ok(); // an empty body is never polled
        }
        body
    }

    fn settle(&mut self, outcome: Outcome) {
        if let Some(t) = self.ticket.take() {
            let usage = self.usage.take().map(UsageScanner::report);
            t.finish(Some(self.served), outcome, usage);
        }
    }

    fn settle_ok(&mut self) {
        let outcome = if self.success {
            Outcome::Success
        } else {
            Outcome::UpstreamStatus
        };
        self.settle(outcome);
    }
}

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.ticket.is_some()
            && let Some(r) = &mut this.revoked
            && r.as_mut().poll(cx).is_ready()
        {
            this.revoked = None;
            tracing::info!(endpoint = %this.served, "response cut off: the request was evicted by flow control");
            this.settle(Outcome::Shed);
            return Poll::Ready(Some(Err(
                "evicted by flow control (in-flight eviction)".into()
            )));
        }
        let polled = match this.first.take() {
            Some(frame) => Poll::Ready(Some(frame)),
            None => Pin::new(&mut this.inner).poll_frame(cx),
        };
        match polled {
            Poll::Ready(Some(Ok(mut frame))) => {
                if let Some(data) = frame.data_ref().filter(|d| !d.is_empty()) {
                    if let Some(u) = this.usage.as_mut() {
                        u.feed(data);
                    }
                    if let Some(t) = this.ticket.as_mut() {
                        t.first_byte();
                    }
                }
                let ended = this.inner.is_end_stream();
                if let (Some(r), Some(data)) = (this.restore.as_mut(), frame.data_ref()) {
                    let mut out = r.feed(data);
                    if ended {
                        out.extend(r.finish());
                    }
                    frame = Frame::data(Bytes::from(out));
                }
                // hyper may stop polling once the body says it has ended.
                if ended {
                    this.settle_ok();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                tracing::warn!(endpoint = %this.served, error = %e, "upstream response broke off");
                this.settle(Outcome::UpstreamError);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                this.settle_ok();
                let held = this.restore.as_mut().map(ModelRestorer::finish);
                match held.filter(|h| !h.is_empty()) {
                    Some(h) => Poll::Ready(Some(Ok(Frame::data(Bytes::from(h))))),
                    None => Poll::Ready(None),
                }
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none()
            && self.inner.is_end_stream()
            && !self
                .restore
                .as_ref()
                .is_some_and(ModelRestorer::holds_bytes)
    }

    fn size_hint(&self) -> SizeHint {
        if self.restore.is_some() {
            return SizeHint::default(); // a restored name may differ in length
        }
        let mut hint = self.inner.size_hint();
        if let Some(Ok(frame)) = &self.first
            && let Some(data) = frame.data_ref()
        {
            let len = data.len() as u64;
            hint.set_lower(hint.lower() + len);
            if let Some(upper) = hint.upper() {
                hint.set_upper(upper + len);
            }
        }
        hint
    }
}
