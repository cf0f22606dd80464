//! The Kubernetes manifests under `deploy/kubernetes` stay true to the binary: the start
//! script's `infermesh serve` command line parses with the node's own flags (for the
//! ordinal that bootstraps and for one that joins), the Envoy bootstrap is what
//! `infermesh xds bootstrap` prints, the EndpointPickerConfig loads, and the example
//! policy objects pass the node's own policy validation. Rendering and schema validation
//! of every overlay run in `scripts/check-kubernetes.py`.

use std::path::{Path, PathBuf};
use std::process::Command;

use clap::Parser;
use infermesh_node::cli::{Cli, Command as Sub};

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes")
}

/// Runs `base/start.sh` as pod `hostname` with a stand-in `infermesh` that records its
/// arguments, and returns them.
fn start_args(hostname: &str) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("args");
    let shim = dir.path().join("infermesh");
    std::fs::write(
        &shim,
        format!(
            "#!/bin/sh\nfor a in \"$@\"; do printf '%s\\n' \"$a\"; done > {}\n",
            out.display()
        ),
    )
    .unwrap();
    Command::new("chmod").arg("+x").arg(&shim).status().unwrap();
    let status = Command::new("sh")
        .arg(deploy().join("base/start.sh"))
        .env_clear()
        .env("PATH", format!("{}:/usr/bin:/bin", dir.path().display()))
        .env("HOSTNAME", hostname)
        .env("POD_IP", "10.1.2.3")
        .env("POD_NAMESPACE", "infermesh")
        .status()
        .unwrap();
    assert!(status.success(), "start.sh failed for {hostname}");
    let text = std::fs::read_to_string(&out).unwrap();
    text.lines().map(str::to_owned).collect()
}

/// Parses the recorded command line, with the Secret's key file path pointed at a real
/// file (the mount does not exist here).
fn parse_serve(args: &[String], key: &Path) -> infermesh_node::cli::ServeArgs {
    let mut args = args.to_vec();
    let at = args
        .iter()
        .position(|a| a == "--cluster-key-file")
        .expect("--cluster-key-file");
    assert_eq!(args[at + 1], "/etc/infermesh/secrets/cluster-key");
    args[at + 1] = key.display().to_string();
    let cli =
        Cli::try_parse_from(std::iter::once("infermesh".to_string()).chain(args.iter().cloned()))
            .unwrap_or_else(|e| panic!("start.sh's command line does not parse: {e}\n{args:?}"));
    match cli.command {
        Sub::Serve(a) => *a,
        other => panic!("start.sh runs {other:?}, not serve"),
    }
}

#[test]
fn ordinal_zero_bootstraps_and_the_others_join_through_it() {
    let key = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(key.path(), "a-cluster-key-of-enough-bytes").unwrap();
    let first = parse_serve(&start_args("infermesh-0"), key.path());
    assert!(first.cluster.bootstrap);
    assert!(first.cluster.join.is_none());
    assert!(first.cluster.admin_token_file.is_some());

    let third = parse_serve(&start_args("infermesh-2"), key.path());
    assert!(!third.cluster.bootstrap);
    assert_eq!(
        third.cluster.join.as_deref(),
        Some("infermesh-0.infermesh-mesh.infermesh.svc:9191")
    );
    for serve in [&first, &third] {
        assert!(serve.mesh.enabled());
        let mesh = serve.mesh.options().expect("mesh flags").expect("mesh on");
        // Seeds are the first ordinals' stable DNS names, resolved at join time.
        assert_eq!(mesh.config.seed_hosts.len(), 3);
        assert!(mesh.config.seed_hosts[0].starts_with("infermesh-0.infermesh-mesh.infermesh.svc:"));
        assert_eq!(mesh.config.gossip_bind.to_string(), "10.1.2.3:7946");
        assert_eq!(
            serve
                .xds
                .advertise_ext_proc_addr
                .map(|a| a.to_string())
                .as_deref(),
            Some("10.1.2.3:9002")
        );
        assert!(serve.cluster.data_dir.is_some());
        // The controller watches the pod's namespace and the config's ConfigMap.
        assert!(serve.kube.kubernetes);
        assert_eq!(
            serve.kube.kubernetes_namespace.as_deref(),
            Some("infermesh")
        );
        assert_eq!(
            serve.kube.kubernetes_config_map.as_deref(),
            Some("infermesh-epp-config/epp-config.yaml")
        );
    }
    assert_eq!(first.mesh.node_name.as_deref(), Some("infermesh-0"));
}

#[test]
fn start_script_refuses_to_run_without_the_pod_ip() {
    let status = Command::new("sh")
        .arg(deploy().join("base/start.sh"))
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOSTNAME", "infermesh-0")
        .env("POD_NAMESPACE", "infermesh")
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(!status.success());
}

#[test]
fn envoy_bootstrap_is_what_the_binary_prints() {
    let text = std::fs::read_to_string(deploy().join("envoy/envoy-bootstrap.yaml")).unwrap();
    let shipped: serde_json::Value = serde_yaml_ng::from_str(&text).unwrap();
    let mut opts =
        infermesh_xds::BootstrapOptions::new("envoy", vec!["infermesh-mesh:9002".to_string()]);
    opts.admin = "0.0.0.0:9901".parse().unwrap();
    let generated = infermesh_xds::envoy_bootstrap(&opts).unwrap();
    assert_eq!(
        shipped, generated,
        "regenerate deploy/kubernetes/envoy/envoy-bootstrap.yaml"
    );
}

#[test]
fn the_shipped_endpoint_picker_config_loads() {
    let text = std::fs::read_to_string(deploy().join("base/epp-config.yaml")).unwrap();
    let cm: serde_json::Value = serde_yaml_ng::from_str(&text).unwrap();
    assert_eq!(cm["kind"], "ConfigMap");
    let config = cm["data"]["epp-config.yaml"]
        .as_str()
        .expect("key epp-config.yaml");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("epp-config.yaml");
    std::fs::write(&path, config).unwrap();
    infermesh_node::config::load_scheduler_config(Some(&path), false)
        .unwrap_or_else(|e| panic!("the ConfigMap's config: {e}"));
}

#[test]
fn example_policy_objects_pass_the_nodes_validation() {
    let dir = deploy().join("examples/gateway-api");
    let mut kinds = Vec::new();
    for file in ["inferencepool.yaml", "objectives.yaml"] {
        let text = std::fs::read_to_string(dir.join(file)).unwrap();
        let objects = infermesh_raft_store::policy::parse_documents(
            &text,
            &infermesh_raft_store::policy::accept_any_epp_config(),
        )
        .unwrap_or_else(|e| panic!("{file}: {e}"));
        kinds.extend(objects.iter().map(|o| format!("{:?}", o.key().kind)));
    }
    assert_eq!(kinds.len(), 4, "{kinds:?}");
}

#[test]
fn the_role_grants_exactly_what_the_controller_uses() {
    let text = std::fs::read_to_string(deploy().join("base/rbac.yaml")).unwrap();
    let mut granted = std::collections::BTreeSet::new();
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let v: serde_json::Value = serde::Deserialize::deserialize(doc).unwrap();
        if v["kind"] != "Role" {
            continue;
        }
        for rule in v["rules"].as_array().unwrap() {
            for g in rule["apiGroups"].as_array().unwrap() {
                for r in rule["resources"].as_array().unwrap() {
                    for verb in rule["verbs"].as_array().unwrap() {
                        granted.insert((
                            g.as_str().unwrap().to_owned(),
                            r.as_str().unwrap().to_owned(),
                            verb.as_str().unwrap().to_owned(),
                        ));
                    }
                }
            }
        }
    }
    let used: std::collections::BTreeSet<_> = infermesh_node::k8s::ACCESS
        .iter()
        .flat_map(|(g, r, verbs)| {
            verbs
                .iter()
                .map(move |v| (g.to_string(), r.to_string(), v.to_string()))
        })
        .collect();
    assert_eq!(granted, used);
}
