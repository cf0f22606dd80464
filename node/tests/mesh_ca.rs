//! The mesh in cluster-CA mode from flags: three `infermesh` processes whose QUIC mesh
//! uses certificates one CA issued (`--mesh-ca-file`, `--mesh-cert-file`,
//! `--mesh-key-file`, `--mesh-server-name`) form the policy cluster (Raft runs over that
//! mesh) and replicate a write to every node.

mod policy_cluster;

use anyhow::Result;
use infermesh_testkit::certs::TestCa;
use policy_cluster::{Cluster, objective};

fn as_refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn nodes_form_a_cluster_over_a_ca_secured_mesh() -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(async {
            let dir = tempfile::tempdir()?;
            let ca = TestCa::new("mesh CA");
            let ca_file = ca.write(dir.path(), "ca")?.display().to_string();
            let mut flags = Vec::new();
            for i in 0..3 {
                let (c, k) = ca
                    .leaf(&format!("node-{i}"), false)
                    .write(dir.path(), &format!("n{i}"))?;
                flags.push(vec![
                    "--mesh-ca-file".to_string(),
                    ca_file.clone(),
                    "--mesh-cert-file".into(),
                    c.display().to_string(),
                    "--mesh-key-file".into(),
                    k.display().to_string(),
                    "--mesh-server-name".into(),
                    "localhost".into(),
                ]);
            }
            let mut c = Cluster::new()?;
            c.bootstrap(&as_refs(&flags[0]))?;
            c.join(0, &as_refs(&flags[1]))?;
            c.join(0, &as_refs(&flags[2]))?;
            c.wait_converged(3).await?;
            c.apply_retrying(1, &objective("over-ca-mesh", 3)).await?;
            c.wait_everywhere("over-ca-mesh", 3).await?;
            Ok(())
        })
}
