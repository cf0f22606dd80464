//! `session-affinity-scorer` (llm-d v0.10): 1.0 for the session's endpoint, 0 elsewhere.
//!
//! Two strategies, as llm-d has them:
//! - `encoded_endpoint_header` (stateless): the request header (`x-session-token` by
//!   default) holds the base64 endpoint token, and every response carries the token of the
//!   endpoint chosen (the `profileName` profile's pick, else the primary one). llm-d
//!   encodes the pod's `namespace/name`; infermesh names endpoints by `ip:port`.
//! - `session_id` (stateful): the session id comes from the first configured header that
//!   is set; the endpoint that served it is remembered (per scheduler replica, as in llm-d)
//!   until unused for `evictionTtlSeconds`. An unbound session, or one whose endpoint is
//!   not a candidate, scores 0 everywhere; the binding moves only when its endpoint was not
//!   a candidate (a pick that merely outweighed it keeps the binding).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hashbrown::HashMap;
use parking_lot::Mutex;

use super::{CycleState, Scorer};
use crate::config::params::{SessionAffinityParams, SessionStrategy};
use crate::model::InferenceRequest;

/// The default request header carrying the session's endpoint.
pub const SESSION_TOKEN_HEADER: &str = "x-session-token";

/// The token naming `addr` (base64 of `ip:port`).
pub fn session_token(addr: SocketAddr) -> String {
    STANDARD.encode(addr.to_string())
}

fn decode_token(token: &str) -> Option<SocketAddr> {
    let decoded = STANDARD.decode(token.trim()).ok()?;
    std::str::from_utf8(&decoded).ok()?.parse().ok()
}

#[derive(Debug, Clone, Copy)]
struct Binding {
    addr: SocketAddr,
    last_seen: Instant,
}

/// `session_id` state: bindings, and whether each scored request's bound endpoint was a
/// candidate (read by the pre-request hook, then dropped).
#[derive(Debug, Default)]
struct Sessions {
    bindings: HashMap<String, Binding>,
    presence: HashMap<String, (bool, Instant)>,
    last_sweep: Option<Instant>,
}

/// A configured `session-affinity-scorer`.
#[derive(Debug)]
pub struct SessionAffinityScorer {
    strategy: SessionStrategy,
    profile: Option<String>,
    header: String,
    id_headers: Vec<String>,
    ttl: Duration,
    sweep: Duration,
    sessions: Mutex<Sessions>,
}

impl SessionAffinityScorer {
    /// A scorer with these (normalized) parameters.
    pub fn new(p: &SessionAffinityParams) -> Self {
        let c = &p.session_id_config;
        SessionAffinityScorer {
            strategy: p.strategy,
            profile: (!p.profile_name.is_empty()).then(|| p.profile_name.clone()),
            header: p.encoded_endpoint_header_config.header.clone(),
            id_headers: c.sources.iter().map(|s| s.header.clone()).collect(),
            ttl: Duration::from_secs_f64(c.eviction_ttl_seconds),
            sweep: Duration::from_secs_f64(c.eviction_sweep_seconds),
            sessions: Mutex::new(Sessions::default()),
        }
    }

    /// The profile whose pick this instance pins (`None`: the primary profile).
    pub fn profile(&self) -> Option<&str> {
        self.profile.as_deref()
    }

    /// The response header to write for a pick at `target` (`encoded_endpoint_header`
    /// only; `session_id` writes nothing back).
    pub fn response_header(&self, target: SocketAddr) -> Option<(String, String)> {
        (self.strategy == SessionStrategy::EncodedEndpointHeader)
            .then(|| (self.header.clone(), session_token(target)))
    }

    fn session_id<'r>(&self, req: &'r InferenceRequest) -> Option<&'r str> {
        self.id_headers
            .iter()
            .filter_map(|h| req.headers.get(h))
            .map(|v| v.trim())
            .find(|v| !v.is_empty())
    }

    fn expired(&self, b: &Binding, now: Instant) -> bool {
        now.saturating_duration_since(b.last_seen) > self.ttl
    }

    /// `session_id`: binds the session to `target` (the instance's profile's pick) after a
    /// pick; a session bound elsewhere moves only if its endpoint was not a candidate.
    pub fn bind(&self, req: &InferenceRequest, target: Option<SocketAddr>, now: Instant) {
        if self.strategy != SessionStrategy::SessionId {
            return;
        }
        let mut s = self.sessions.lock();
        let present = s.presence.remove(&req.id).map(|(p, _)| p);
        if s.last_sweep
            .is_none_or(|t| now.saturating_duration_since(t) >= self.sweep)
        {
            s.last_sweep = Some(now);
            let ttl = self.ttl;
            s.bindings
                .retain(|_, b| now.saturating_duration_since(b.last_seen) <= ttl);
            s.presence
                .retain(|_, (_, at)| now.saturating_duration_since(*at) <= ttl);
        }
        let (Some(id), Some(addr)) = (self.session_id(req), target) else {
            return;
        };
        let fresh = Binding {
            addr,
            last_seen: now,
        };
        match s.bindings.get(id).copied() {
            Some(b) if !self.expired(&b, now) && b.addr != addr && present != Some(false) => {}
            _ => {
                s.bindings.insert(id.to_owned(), fresh);
            }
        }
    }

    /// The endpoint `session_id` is bound to (for tests and inspection).
    pub fn bound(&self, session: &str, now: Instant) -> Option<SocketAddr> {
        let s = self.sessions.lock();
        s.bindings
            .get(session)
            .filter(|b| !self.expired(b, now))
            .map(|b| b.addr)
    }
}

impl Scorer for SessionAffinityScorer {
    fn score(&self, cycle: &CycleState<'_>, candidates: &[usize], out: &mut [f64]) {
        out.fill(0.0);
        let target = match self.strategy {
            SessionStrategy::EncodedEndpointHeader => cycle
                .request
                .headers
                .get(&self.header)
                .and_then(|t| decode_token(t)),
            SessionStrategy::SessionId => {
                let Some(id) = self.session_id(cycle.request) else {
                    return;
                };
                let mut s = self.sessions.lock();
                let Some(b) = s
                    .bindings
                    .get(id)
                    .copied()
                    .filter(|b| !self.expired(b, cycle.now))
                else {
                    return;
                };
                let present = candidates
                    .iter()
                    .any(|&i| cycle.endpoints[i].address == b.addr);
                s.presence
                    .insert(cycle.request.id.clone(), (present, cycle.now));
                Some(b.addr)
            }
        };
        let Some(addr) = target else { return };
        for (o, &i) in out.iter_mut().zip(candidates) {
            if cycle.endpoints[i].address == addr {
                *o = 1.0;
            }
        }
    }
}
