//! The `infermesh` binary's exit codes and messages for config errors.

use std::process::Command;

fn infermesh() -> Command {
    Command::new(env!("CARGO_BIN_EXE_infermesh"))
}

fn example(name: &str) -> String {
    format!("{}/../deploy/examples/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn config_check_prints_the_resolved_config() {
    let out = infermesh()
        .args(["config", "check", &example("epp-config.yaml")])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in ["queue-scorer", "prefix-cache-scorer", "max-score-picker"] {
        assert!(stdout.contains(needle), "missing {needle}:\n{stdout}");
    }
}

#[test]
fn config_check_names_the_bad_plugin() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: no-such-scorer\n",
    )
    .unwrap();
    let out = infermesh()
        .args(["config", "check"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no-such-scorer"), "{stderr}");
}

#[test]
fn serve_exits_64_on_a_bad_endpoints_file_before_binding() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool.yaml");
    std::fs::write(
        &path,
        "apiVersion: inference.networking.k8s.io/v1\nkind: InferencePool\nmetadata: {name: p}\n\
         spec: {selector: {matchLabels: {app: vllm}}, targetPorts: [{number: 8000}]}\n\
         pods:\n- {address: not-an-ip}\n",
    )
    .unwrap();
    let out = infermesh()
        .args([
            "serve",
            "--ext-proc-addr",
            "127.0.0.1:0",
            "--proxy-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
            "--endpoints",
        ])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("pods[0].address"), "{stderr}");
}

#[test]
fn serve_exits_64_on_contradictory_flags() {
    let out = infermesh()
        .args([
            "serve",
            "--ext-proc-addr",
            "127.0.0.1:0",
            "--endpoints",
            &example("pool.yaml"),
            "--refresh-metrics-interval",
            "5s",
            "--metrics-staleness-threshold",
            "1s",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("metrics-staleness-threshold"));
}

#[test]
fn sidecar_with_ssrf_protection_and_no_way_to_learn_the_pool_exits_64() {
    let base = ["sidecar", "--bind", "127.0.0.1", "--port", "0"];
    let out = infermesh()
        .args(base)
        .arg("--enable-ssrf-protection")
        .env_remove("INFERENCE_POOL")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--inference-pool"));

    let out = infermesh()
        .args(base)
        .args(["--enable-ssrf-protection", "--vllm-port", "8001"])
        .env("INFERENCE_POOL", "llama")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--endpoints") && stderr.contains("endpoints file"),
        "{stderr}"
    );

    let out = infermesh()
        .args(base)
        .args(["--kv-connector", "mooncake"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("nixlv2") && stderr.contains("shared-storage") && stderr.contains("sglang"),
        "{stderr}"
    );
}

const ALPHA_CONFIG: &str = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n\
- type: utilization-filter\n  name: caps\n  parameters: {conditions: [{metric: waiting-queue, maxValue: 4}]}\n\
- type: queue-scorer\n";

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn config_check_names_each_plugin_as_current_alias_or_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        &dir,
        "mixed.yaml",
        "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n\
         - type: queue-scorer\n\
         - type: by-label-selector\n  name: gpu\n  parameters: {matchLabels: {gpu: h100}}\n\
         - type: utilization-filter\n  name: caps\n  parameters: {conditions: [{metric: waiting-queue, maxValue: 4}]}\n\
         - type: active-request-filter\n\
         - type: precise-prefix-cache-scorer\n\
         - type: made-up-scorer\n",
    );
    let out = infermesh()
        .args(["config", "check"])
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = |name: &str| {
        stdout
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no line for {name}:\n{stdout}"))
            .to_owned()
    };
    assert!(line("queue-scorer").ends_with("v0.10 name"), "{stdout}");
    assert!(
        line("gpu").contains("accepted older alias of `label-selector-filter`"),
        "{stdout}"
    );
    assert!(
        line("caps").contains("Alpha in llm-d: needs --allow-experimental-plugins"),
        "{stdout}"
    );
    assert!(
        line("active-request-filter").contains("refused: renamed utilization-filter"),
        "{stdout}"
    );
    assert!(
        line("precise-prefix-cache-scorer").contains(
            "accepted older alias of `precise-prefix-cache-producer + prefix-cache-scorer`"
        ),
        "{stdout}"
    );
    assert!(
        line("made-up-scorer").contains("refused: no llm-d plugin type has this name"),
        "{stdout}"
    );
    // Loading stops at the first refused plugin.
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("active-request-filter"));
}

#[test]
fn config_check_lists_the_burst_producer_as_alpha_and_loads_it_with_the_flag() {
    let fixture = format!(
        "{}/../scheduler/tests/fixtures/v010-burst-prefix.yaml",
        env!("CARGO_MANIFEST_DIR")
    );
    let out = infermesh()
        .args(["config", "check", &fixture])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("burst-prefix-cache-producer "))
        .unwrap_or_else(|| panic!("no line for the producer:\n{stdout}"));
    assert!(
        line.contains("v0.10 name, Alpha in llm-d: needs --allow-experimental-plugins"),
        "{line}"
    );
    assert_eq!(out.status.code(), Some(64), "{stdout}");
    let out = infermesh()
        .args(["config", "check", "--allow-experimental-plugins", &fixture])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("\"windowDurationMs\":50"), "{stdout}");
}

#[test]
fn alpha_plugins_need_allow_experimental_plugins_in_check_and_serve() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "alpha.yaml", ALPHA_CONFIG);
    let out = infermesh()
        .args(["config", "check"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("plugin `caps` (type `utilization-filter`)")
            && stderr.contains("--allow-experimental-plugins"),
        "{stderr}"
    );
    let out = infermesh()
        .args(["config", "check", "--allow-experimental-plugins"])
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("utilization-filter"), "{stdout}");
    // serve refuses before binding, naming the plugin and the flag.
    let out = infermesh()
        .args([
            "serve",
            "--ext-proc-addr",
            "127.0.0.1:0",
            "--proxy-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
            "--endpoints",
            &example("pool.yaml"),
            "--config-file",
        ])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("caps") && stderr.contains("--allow-experimental-plugins"),
        "{stderr}"
    );
}

#[test]
fn config_names_lists_every_known_type_with_its_status() {
    let out = infermesh().args(["config", "names"]).output().unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let status = |t: &str| {
        stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(t))
            .unwrap_or_else(|| panic!("{t} missing:\n{stdout}"))
            .to_owned()
    };
    assert!(status("queue-scorer").ends_with("v0.10 name"));
    assert!(status("topology-affinity-scorer").contains("Alpha"));
    assert!(status("pd-profile-handler").contains("older alias of `disagg-profile-handler`"));
    assert!(status("file-discovery").ends_with("v0.10 name"));
    assert!(status("burst-prefix-cache-producer").contains("Alpha"));
    assert!(status("session-id-producer").contains("refused"));
    assert!(status("prefill-load-scorer").contains("infermesh's own"));
    assert!(status("fair-share-holdback-policy").contains("infermesh's own"));
    let mut names: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let n = names.len();
    names.dedup();
    assert_eq!(names.len(), n, "each name once");
}
