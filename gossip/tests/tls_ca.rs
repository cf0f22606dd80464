//! Cluster-CA mode: nodes with CA-issued certificates talk; a certificate from another CA
//! is refused even when the node holds the cluster key.

mod cluster;

use std::path::{Path, PathBuf};
use std::time::Duration;

use cluster::{config, wait_for};
use infermesh_gossip::{Mesh, MeshConfig, RpcError, TlsConfig};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

const NAME: &str = "mesh.infermesh.test";

struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    pem_path: PathBuf,
}

fn make_ca(dir: &Path, label: &str) -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    let pem_path = dir.join(format!("{label}-ca.pem"));
    std::fs::write(&pem_path, issuer.pem()).unwrap();
    Ca { issuer, pem_path }
}

fn node_tls(dir: &Path, ca: &Ca, trust: &Path, label: &str) -> TlsConfig {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec![NAME.to_owned()]).unwrap();
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    let cert_path = dir.join(format!("{label}.pem"));
    let key_path = dir.join(format!("{label}.key"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    TlsConfig::ClusterCa {
        ca_cert: trust.to_owned(),
        cert: cert_path,
        key: key_path,
        server_name: NAME.to_owned(),
    }
}

fn with_tls(name: &str, tls: TlsConfig, seed: Option<&Mesh>) -> MeshConfig {
    let mut c = config(name);
    c.tls = tls;
    c.seeds = seed.map(|s| vec![s.gossip_addr()]).unwrap_or_default();
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_issued_nodes_talk_and_foreign_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = make_ca(dir.path(), "good");
    let other = make_ca(dir.path(), "other");

    let a = Mesh::start(with_tls(
        "a",
        node_tls(dir.path(), &ca, &ca.pem_path, "a"),
        None,
    ))
    .await
    .unwrap();
    let b = Mesh::start(with_tls(
        "b",
        node_tls(dir.path(), &ca, &ca.pem_path, "b"),
        Some(&a),
    ))
    .await
    .unwrap();
    // Signed by another CA (but trusting ours): holds the cluster key, so gossip admits it.
    let c = Mesh::start(with_tls(
        "c",
        node_tls(dir.path(), &other, &ca.pem_path, "c"),
        Some(&a),
    ))
    .await
    .unwrap();
    wait_for("three members", || {
        [&a, &b, &c]
            .iter()
            .all(|m| m.members().borrow().members.len() == 3)
    })
    .await;

    let mut rx = b.register_service(1, 4).unwrap();
    tokio::spawn(async move {
        while let Some(call) = rx.recv().await {
            call.respond(b"pong".to_vec());
        }
    });
    let answer = a
        .call_service(b.node_id(), 1, b"ping".to_vec(), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(&answer[..], b"pong");

    // The foreign certificate fails the TLS handshake in either direction.
    let from_c = c
        .call_service(b.node_id(), 1, b"ping".to_vec(), Duration::from_secs(5))
        .await;
    assert!(
        matches!(from_c, Err(RpcError::Connect(_) | RpcError::Transport(_))),
        "{from_c:?}"
    );
    let to_c = a
        .call_service(c.node_id(), 1, b"ping".to_vec(), Duration::from_secs(5))
        .await;
    assert!(
        matches!(to_c, Err(RpcError::Connect(_) | RpcError::Transport(_))),
        "{to_c:?}"
    );
}

#[tokio::test]
async fn missing_pem_files_are_named_in_the_error() {
    let mut c = config("x");
    c.tls = TlsConfig::ClusterCa {
        ca_cert: "/nonexistent/ca.pem".into(),
        cert: "/nonexistent/cert.pem".into(),
        key: "/nonexistent/key.pem".into(),
        server_name: NAME.into(),
    };
    let err = Mesh::start(c).await.unwrap_err().to_string();
    assert!(
        err.contains("ca_cert") && err.contains("/nonexistent/ca.pem"),
        "{err}"
    );
}
