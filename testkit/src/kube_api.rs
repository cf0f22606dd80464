//! An in-process Kubernetes API server for controller tests, behaving as the real one does
//! for what a kube-rs controller uses:
//!
//! - list (`GET .../{plural}`) answering with the collection's `resourceVersion`;
//! - watch (`?watch=true&resourceVersion=N`) streaming every change after `N` as JSON
//!   lines, with `BOOKMARK` events when asked (`allowWatchBookmarks`), ending at
//!   `timeoutSeconds`; a `resourceVersion` older than the compacted history gets an
//!   `ERROR` event with a 410 `Expired` Status, as etcd compaction causes;
//! - `fieldSelector=metadata.name=X`;
//! - the status subresource (`GET`/`PUT .../{name}/status`), refusing a write whose
//!   `metadata.resourceVersion` is not the stored one with 409 `Conflict`;
//! - 404 `NotFound` for a resource type whose CRD is not installed.
//!
//! Tests drive it directly: create, change and delete objects, compact the history, cut
//! every open watch, and inject status conflicts. Only plain HTTP on loopback.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::{broadcast, watch};

/// A served resource type: `group` (empty for core), `version`, `plural`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Res {
    /// API group (`""` for the core group).
    pub group: String,
    /// Version.
    pub version: String,
    /// Plural resource name.
    pub plural: String,
}

impl Res {
    /// A resource type.
    pub fn new(group: &str, version: &str, plural: &str) -> Res {
        Res {
            group: group.into(),
            version: version.into(),
            plural: plural.into(),
        }
    }

    fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

#[derive(Debug, Clone)]
struct Event {
    rv: u64,
    res: Res,
    namespace: String,
    kind: &'static str,
    object: Value,
}

#[derive(Debug, Default)]
struct Inner {
    rv: u64,
    installed: BTreeSet<Res>,
    objects: BTreeMap<(Res, String, String), Value>,
    history: VecDeque<Event>,
    /// Watches from a resourceVersion below this get 410.
    floor: u64,
    conflicts_to_inject: usize,
    conflicts_sent: u64,
    expired_sent: u64,
    lists: u64,
    status_writes: u64,
}

struct Shared {
    inner: Mutex<Inner>,
    events: broadcast::Sender<Event>,
    cut: watch::Sender<u64>,
}

/// A running in-process API server; stops when dropped.
pub struct KubeApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for KubeApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn status(code: u16, reason: &str, message: impl Into<String>) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message.into(), "reason": reason, "code": code,
    });
    (
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// Where a request points.
struct Target {
    res: Res,
    namespace: String,
    name: Option<String>,
    subresource: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    let seg: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (res_prefix, rest): ((&str, &str), &[&str]) = match seg.as_slice() {
        ["api", v, rest @ ..] => (("", v), rest),
        ["apis", g, v, rest @ ..] => ((g, v), rest),
        _ => return None,
    };
    match rest {
        ["namespaces", ns, plural, tail @ ..] if tail.len() <= 2 => Some(Target {
            res: Res::new(res_prefix.0, res_prefix.1, plural),
            namespace: (*ns).to_owned(),
            name: tail.first().map(|s| (*s).to_owned()),
            subresource: tail.get(1).map(|s| (*s).to_owned()),
        }),
        _ => None,
    }
}

fn rv_of(v: &Value) -> u64 {
    v["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn name_selector(q: &BTreeMap<String, String>) -> Option<String> {
    q.get("fieldSelector")
        .and_then(|f| f.strip_prefix("metadata.name="))
        .map(str::to_owned)
}

impl Shared {
    fn record(&self, inner: &mut Inner, res: &Res, ns: &str, kind: &'static str, object: Value) {
        let ev = Event {
            rv: inner.rv,
            res: res.clone(),
            namespace: ns.to_owned(),
            kind,
            object,
        };
        inner.history.push_back(ev.clone());
        let _ = self.events.send(ev);
    }
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    Query(q): Query<BTreeMap<String, String>>,
    body: Bytes,
) -> Response {
    let Some(t) = parse_path(uri.path()) else {
        return status(
            404,
            "NotFound",
            format!("the server could not find {}", uri.path()),
        );
    };
    if !shared.inner.lock().unwrap().installed.contains(&t.res) {
        return status(
            404,
            "NotFound",
            format!(
                "the server could not find the requested resource ({})",
                t.res.plural
            ),
        );
    }
    match (&method, &t.name, t.subresource.as_deref()) {
        (&Method::GET, None, None) if q.get("watch").is_some_and(|w| w == "true" || w == "1") => {
            watch_response(shared, t, &q)
        }
        (&Method::GET, None, None) => list(&shared, &t, &q),
        (&Method::GET, Some(name), None | Some("status")) => {
            let inner = shared.inner.lock().unwrap();
            match inner
                .objects
                .get(&(t.res.clone(), t.namespace.clone(), name.clone()))
            {
                Some(o) => axum::Json(o.clone()).into_response(),
                None => status(
                    404,
                    "NotFound",
                    format!("{} {name:?} not found", t.res.plural),
                ),
            }
        }
        (&Method::PUT, Some(name), Some("status")) => put_status(&shared, &t, name, &body),
        _ => status(
            405,
            "MethodNotAllowed",
            format!("{method} {} is not served here", uri.path()),
        ),
    }
}

fn list(shared: &Shared, t: &Target, q: &BTreeMap<String, String>) -> Response {
    let mut inner = shared.inner.lock().unwrap();
    inner.lists += 1;
    let only = name_selector(q);
    let items: Vec<Value> = inner
        .objects
        .iter()
        .filter(|((r, ns, name), _)| {
            *r == t.res && *ns == t.namespace && only.as_ref().is_none_or(|n| n == name)
        })
        .map(|(_, v)| v.clone())
        .collect();
    axum::Json(json!({
        "apiVersion": t.res.api_version(),
        "kind": "List",
        "metadata": {"resourceVersion": inner.rv.to_string()},
        "items": items,
    }))
    .into_response()
}

fn line(v: &Value) -> Bytes {
    let mut s = v.to_string();
    s.push('\n');
    Bytes::from(s)
}

fn watch_response(shared: Arc<Shared>, t: Target, q: &BTreeMap<String, String>) -> Response {
    let from: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|b| b == "true");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|v| v.parse().ok())
        .map_or(Duration::from_secs(290), Duration::from_secs);
    let only = name_selector(q);
    // Subscribe before reading the history, so no change falls between the two.
    let mut live = shared.events.subscribe();
    let mut cut = shared.cut.subscribe();
    let (backlog, expired) = {
        let mut inner = shared.inner.lock().unwrap();
        if from != 0 && from < inner.floor {
            inner.expired_sent += 1;
            (Vec::new(), true)
        } else {
            let start = if from == 0 { inner.rv } else { from };
            let backlog = inner
                .history
                .iter()
                .filter(|e| e.rv > start)
                .cloned()
                .collect::<Vec<_>>();
            (backlog, false)
        }
    };
    let api_version = t.res.api_version();
    let matches = move |e: &Event| {
        e.res == t.res
            && e.namespace == t.namespace
            && only
                .as_ref()
                .is_none_or(|n| e.object["metadata"]["name"].as_str() == Some(n))
    };
    let stream = async_stream(move |tx| async move {
        if expired {
            let _ = tx
                .send(line(&json!({"type": "ERROR", "object": {
                    "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": format!("too old resource version: {from}"),
                    "reason": "Expired", "code": 410,
                }})))
                .await;
            return;
        }
        let mut last = from;
        for e in backlog.into_iter().filter(|e| matches(e)) {
            last = last.max(e.rv);
            if tx
                .send(line(&json!({"type": e.kind, "object": e.object})))
                .await
                .is_err()
            {
                return;
            }
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut bookmark = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                () = &mut deadline => return,
                _ = cut.changed() => return,
                ev = live.recv() => match ev {
                    Ok(e) if e.rv > last && matches(&e) => {
                        last = e.rv;
                        if tx.send(line(&json!({"type": e.kind, "object": e.object}))).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    // A lagging watcher is cut, as the real server does; it resumes.
                    Err(_) => return,
                },
                _ = bookmark.tick(), if bookmarks => {
                    let rv = last.max(from);
                    if rv > 0 {
                        let b = json!({"type": "BOOKMARK", "object": {
                            "apiVersion": api_version, "kind": "Bookmark",
                            "metadata": {"resourceVersion": rv.to_string()},
                        }});
                        if tx.send(line(&b)).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
    });
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| status(500, "InternalError", "response"))
}

/// A stream fed by a task through a small channel.
fn async_stream<F, Fut>(f: F) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Bytes>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(f(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok)
}

use futures::StreamExt as _;

fn put_status(shared: &Shared, t: &Target, name: &str, body: &[u8]) -> Response {
    let Ok(sent) = serde_json::from_slice::<Value>(body) else {
        return status(400, "BadRequest", "body is not JSON");
    };
    let mut inner = shared.inner.lock().unwrap();
    let key = (t.res.clone(), t.namespace.clone(), name.to_owned());
    let Some(stored) = inner.objects.get(&key).cloned() else {
        return status(
            404,
            "NotFound",
            format!("{} {name:?} not found", t.res.plural),
        );
    };
    if inner.conflicts_to_inject > 0 || rv_of(&sent) != rv_of(&stored) {
        inner.conflicts_to_inject = inner.conflicts_to_inject.saturating_sub(1);
        inner.conflicts_sent += 1;
        return status(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} {name:?}: the object has been modified; please apply your changes to the latest version and try again",
                t.res.plural
            ),
        );
    }
    inner.rv += 1;
    inner.status_writes += 1;
    let mut updated = stored;
    updated["status"] = sent.get("status").cloned().unwrap_or(Value::Null);
    updated["metadata"]["resourceVersion"] = json!(inner.rv.to_string());
    inner.objects.insert(key, updated.clone());
    shared.record(
        &mut inner,
        &t.res,
        &t.namespace,
        "MODIFIED",
        updated.clone(),
    );
    axum::Json(updated).into_response()
}

impl KubeApiServer {
    /// Starts a server on 127.0.0.1 serving pods and configmaps; add CRDs with [`install`].
    ///
    /// [`install`]: KubeApiServer::install
    pub async fn start() -> anyhow::Result<KubeApiServer> {
        let (events, _) = broadcast::channel(4096);
        let (cut, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                rv: 1,
                ..Inner::default()
            }),
            events,
            cut,
        });
        shared
            .inner
            .lock()
            .unwrap()
            .installed
            .extend([Res::new("", "v1", "pods"), Res::new("", "v1", "configmaps")]);
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(KubeApiServer { addr, shared, task })
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves a resource type (what installing its CRD does).
    pub fn install(&self, group: &str, version: &str, plural: &str) {
        self.shared
            .inner
            .lock()
            .unwrap()
            .installed
            .insert(Res::new(group, version, plural));
    }

    /// Creates or replaces an object of resource `plural` (group and version from its
    /// `apiVersion`), as `kubectl apply` would: a new resourceVersion, the generation bumped
    /// when `spec` changed, `status` kept.
    pub fn apply(&self, plural: &str, mut object: Value) {
        let api_version = object["apiVersion"].as_str().unwrap_or("v1").to_owned();
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", &api_version));
        let res = Res::new(group, version, plural);
        let ns = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_owned();
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let mut inner = self.shared.inner.lock().unwrap();
        inner.rv += 1;
        let key = (res.clone(), ns.clone(), name.clone());
        let previous = inner.objects.get(&key).cloned();
        let generation = match &previous {
            Some(p) if p.get("spec") == object.get("spec") => p["metadata"]["generation"].clone(),
            Some(p) => json!(p["metadata"]["generation"].as_i64().unwrap_or(1) + 1),
            None => json!(1),
        };
        object["metadata"]["namespace"] = json!(ns);
        object["metadata"]["resourceVersion"] = json!(inner.rv.to_string());
        object["metadata"]["generation"] = generation;
        object["metadata"]["uid"] = json!(format!("uid-{plural}-{ns}-{name}"));
        if let Some(p) = &previous
            && object.get("status").is_none()
            && let Some(s) = p.get("status")
        {
            object["status"] = s.clone();
        }
        inner.objects.insert(key, object.clone());
        let kind = if previous.is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.shared.record(&mut inner, &res, &ns, kind, object);
    }

    /// Deletes an object; false when it did not exist.
    pub fn delete(&self, api_version: &str, plural: &str, namespace: &str, name: &str) -> bool {
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        let res = Res::new(group, version, plural);
        let mut inner = self.shared.inner.lock().unwrap();
        let Some(mut gone) =
            inner
                .objects
                .remove(&(res.clone(), namespace.to_owned(), name.to_owned()))
        else {
            return false;
        };
        inner.rv += 1;
        gone["metadata"]["resourceVersion"] = json!(inner.rv.to_string());
        self.shared
            .record(&mut inner, &res, namespace, "DELETED", gone);
        true
    }

    /// The stored object.
    pub fn get(
        &self,
        api_version: &str,
        plural: &str,
        namespace: &str,
        name: &str,
    ) -> Option<Value> {
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        self.shared
            .inner
            .lock()
            .unwrap()
            .objects
            .get(&(
                Res::new(group, version, plural),
                namespace.to_owned(),
                name.to_owned(),
            ))
            .cloned()
    }

    /// Forgets the change history (as etcd compaction does): a watch resuming from any
    /// resourceVersion before now gets 410 Gone and must relist.
    pub fn compact(&self) {
        let mut inner = self.shared.inner.lock().unwrap();
        inner.floor = inner.rv + 1;
        inner.history.clear();
    }

    /// Ends every open watch stream (clients resume from their last resourceVersion).
    pub fn cut_watches(&self) {
        self.shared.cut.send_modify(|n| *n += 1);
    }

    /// The next `n` status writes are refused with 409 Conflict.
    pub fn inject_status_conflicts(&self, n: usize) {
        self.shared.inner.lock().unwrap().conflicts_to_inject += n;
    }

    /// (409s sent on status writes, 410s sent on watches, list calls, status writes done).
    pub fn counters(&self) -> (u64, u64, u64, u64) {
        let i = self.shared.inner.lock().unwrap();
        (i.conflicts_sent, i.expired_sent, i.lists, i.status_writes)
    }

    /// Writes a kubeconfig for this server (plain HTTP, default namespace `namespace`)
    /// into `dir` and returns its path.
    pub fn write_kubeconfig(&self, dir: &Path, namespace: &str) -> anyhow::Result<PathBuf> {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: test\nclusters:\n- name: test\n  cluster:\n    server: http://{}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: test\n    namespace: {namespace}\nusers:\n- name: test\n  user:\n    token: test-token\n",
            self.addr
        );
        std::fs::write(&path, text)?;
        Ok(path)
    }
}
