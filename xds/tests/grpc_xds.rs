//! gRPC's own xDS client (Python `grpcio`, target `xds:///NAME`) resolves the ext_proc
//! service of the live nodes from the infermesh xDS server and calls it.

mod support;

use std::time::Duration;

use infermesh_testkit::{block_on, wait_for, workspace_dir};
use infermesh_xds::{ResourceType, XdsInput};
use support::{PickerNode, XdsNode, start_backend};

const CLIENT: &str = r#"
import sys, grpc
channel = grpc.insecure_channel(sys.argv[1])
grpc.channel_ready_future(channel).result(timeout=30)
check = channel.unary_unary("/grpc.health.v1.Health/Check")
# An empty HealthCheckRequest asks about the whole server.
print(check(b"", timeout=10).hex())
"#;

fn python() -> std::path::PathBuf {
    let py = workspace_dir().join(".venv-test/bin/python");
    let ok = std::process::Command::new(&py)
        .args(["-c", "import grpc"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "grpcio not installed in {}: run xds/tests/setup-grpcio.sh (called by scripts/setup-test-deps.sh)",
        py.display()
    );
    py
}

#[test]
fn grpc_python_resolves_xds_target() {
    let py = python();
    block_on(async {
        let backend = start_backend("unused").await;
        let picker = PickerNode::start("picker-1", backend).await;
        let node = XdsNode::start().await;
        node.server
            .publish(&XdsInput {
                pools: vec![],
                ext_proc_endpoints: vec![picker.addr],
                grpc_services: vec!["infermesh-epp".into()],
            })
            .unwrap();
        wait_for("the snapshot", Duration::from_secs(10), || async {
            node.server.current()
        })
        .await;

        let dir = tempfile::tempdir().unwrap();
        let bootstrap = dir.path().join("bootstrap.json");
        let config = serde_json::json!({
            "xds_servers": [{
                "server_uri": node.addr.to_string(),
                "channel_creds": [{"type": "insecure"}],
                "server_features": ["xds_v3"]
            }],
            "node": {"id": "grpc-python", "cluster": "infermesh-test", "locality": {}}
        });
        std::fs::write(&bootstrap, serde_json::to_vec(&config).unwrap()).unwrap();
        let script = dir.path().join("client.py");
        std::fs::write(&script, CLIENT).unwrap();

        let out = tokio::time::timeout(
            Duration::from_secs(60),
            tokio::process::Command::new(&py)
                .arg(&script)
                .arg("xds:///infermesh-epp")
                .env("GRPC_XDS_BOOTSTRAP", &bootstrap)
                .kill_on_drop(true)
                .output(),
        )
        .await
        .expect("python client finished in time")
        .expect("python ran");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "grpc client failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        // HealthCheckResponse { status: SERVING } from the picker, reached through xDS.
        assert_eq!(stdout.trim(), "0801");

        let status = node.server.sync_status();
        let json = serde_json::to_value(&status).expect("sync status serializes");
        assert_eq!(json["envoys"][0]["node_id"], "grpc-python");
        assert_eq!(json["envoys"][0]["types"][2]["type"], "listener");
        let client = status
            .envoys
            .iter()
            .find(|e| e.node_id == "grpc-python")
            .expect("the gRPC client in the sync status");
        assert!(
            client.user_agent.contains("Python"),
            "{}",
            client.user_agent
        );
        let lds = &client.types[ResourceType::Listener as usize];
        assert!(
            !lds.wildcard && lds.names == 1,
            "gRPC asks for its listener by name: {lds:?}"
        );
        for t in &client.types {
            assert!(
                t.subscribed && t.last_acked.is_some() && t.nack.is_none(),
                "{t:?}"
            );
        }
    });
}
