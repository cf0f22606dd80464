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
