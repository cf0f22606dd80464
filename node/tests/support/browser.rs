//! A headless Chromium driven over WebDriver (Debian's `chromium` and `chromium-driver`,
//! installed by `scripts/setup-test-deps.sh`): the few commands the status-page test needs,
//! sent as plain JSON over HTTP to `chromedriver`.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::Full;
use infermesh_node::upstream::{HttpClient, http_client};

use super::send;

/// A chromedriver process with one browser session.
pub struct Browser {
    driver: Child,
    addr: SocketAddr,
    session: String,
    client: HttpClient,
}

fn which(env: &str, candidates: &[&str]) -> String {
    if let Ok(p) = std::env::var(env) {
        return p;
    }
    candidates
        .iter()
        .find(|c| Path::new(c).exists())
        .map(|c| (*c).to_owned())
        .unwrap_or_else(|| {
            panic!(
                "no {} (run scripts/setup-test-deps.sh, or set ${env})",
                candidates[0]
            )
        })
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session.
    pub async fn start() -> Browser {
        let driver_bin = which("CHROMEDRIVER", &["/usr/bin/chromedriver"]);
        let chromium = which(
            "CHROMIUM",
            &["/usr/bin/chromium", "/usr/bin/chromium-browser"],
        );
        let port = super::free_port();
        let driver = Command::new(driver_bin)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let client = http_client(Duration::from_secs(60));
        let mut b = Browser {
            driver,
            addr,
            session: String::new(),
            client,
        };
        infermesh_testkit::wait_for("chromedriver ready", Duration::from_secs(20), || async {
            b.call(http::Method::GET, "/status", None).await.ok()
        })
        .await;
        let caps = serde_json::json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1400,1100"]
            }
        }}});
        let v = b
            .call(http::Method::POST, "/session", Some(caps))
            .await
            .expect("browser session");
        b.session = v["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session id in {v}"))
            .to_owned();
        b
    }

    async fn call(
        &self,
        method: http::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, String> {
        let req = http::Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.addr))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(
                body.map(|b| b.to_string()).unwrap_or_default(),
            )))
            .map_err(|e| e.to_string())?;
        let r = send(&self.client, req).await?;
        let v: serde_json::Value =
            serde_json::from_slice(&r.body).map_err(|e| format!("{e}: {:?}", r.body))?;
        if r.status != 200 {
            return Err(format!("{path}: {} {v}", r.status));
        }
        Ok(v["value"].clone())
    }

    /// Opens `url`.
    pub async fn open(&self, url: &str) {
        self.call(
            http::Method::POST,
            &format!("/session/{}/url", self.session),
            Some(serde_json::json!({ "url": url })),
        )
        .await
        .expect("navigate");
    }

    /// Runs `script` (a function body ending in `return …`) in the page.
    pub async fn eval(&self, script: &str) -> serde_json::Value {
        self.call(
            http::Method::POST,
            &format!("/session/{}/execute/sync", self.session),
            Some(serde_json::json!({ "script": script, "args": [] })),
        )
        .await
        .expect("script runs")
    }

    /// Saves a PNG screenshot of the page to `path`.
    pub async fn screenshot(&self, path: &Path) {
        let v = self
            .call(
                http::Method::GET,
                &format!("/session/{}/screenshot", self.session),
                None,
            )
            .await
            .expect("screenshot");
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().expect("base64 string"))
            .expect("valid base64");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("screenshot dir");
        }
        std::fs::write(path, png).expect("screenshot written");
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
