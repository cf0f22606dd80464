//! The admin API's security across real `infermesh` processes: served over mTLS (writes
//! through a follower are forwarded to the leader over mTLS, `--join` runs over it, and a
//! plaintext client, one without a certificate, one another CA signed and one with an
//! expired certificate are refused); read and write tokens kept apart; tokens rotated
//! through policy with the CLI, the old one refused everywhere afterwards.

mod policy_cluster;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, ensure};
use http::{Method, StatusCode};
use infermesh_node::admin::client::{AdminClient, AdminTls};
use infermesh_testkit::certs::TestCa;
use policy_cluster::{Cluster, TOKEN, objective, run, wait_for};

/// Runs the `infermesh` CLI; returns (success, stdout, stderr).
fn cli(args: &[&str]) -> Result<(bool, String, String)> {
    let out = Command::new(env!("CARGO_BIN_EXE_infermesh"))
        .args(args)
        .output()
        .context("run infermesh")?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// `infermesh tokens ACTION --role ROLE --from-file FILE` against `server` with the bearer
/// token in `token_file`; returns (success, stdout, stderr).
fn tokens_cli(
    action: &str,
    role: &str,
    file: &Path,
    server: &str,
    token_file: &Path,
) -> Result<(bool, String, String)> {
    cli(&[
        "tokens",
        action,
        "--role",
        role,
        "--from-file",
        path(file),
        "--server",
        server,
        "--token-file",
        path(token_file),
    ])
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

/// Whether a call was refused before it reached the API (handshake or protocol failure).
async fn refused(client: &AdminClient) -> bool {
    client.call(Method::GET, "/v1/node", None).await.is_err()
}

#[test]
fn the_admin_api_serves_mtls_forwards_over_it_and_refuses_other_clients() -> Result<()> {
    run(async {
        let dir = tempfile::tempdir()?;
        let ca = TestCa::new("infermesh admin CA");
        let ca_file = ca.write(dir.path(), "ca")?;
        let (server_cert, server_key) = ca.leaf("admin", false).write(dir.path(), "server")?;
        let (op_cert, op_key) = ca.leaf("operator", false).write(dir.path(), "operator")?;
        let (old_cert, old_key) = ca.leaf("operator", true).write(dir.path(), "expired")?;
        let other = TestCa::new("someone else's CA");
        let (alien_cert, alien_key) = other.leaf("operator", false).write(dir.path(), "alien")?;

        let operator = AdminTls {
            ca_file: Some(ca_file.clone()),
            cert_file: Some(op_cert.clone()),
            key_file: Some(op_key.clone()),
        };
        let mut c = Cluster::with_admin_tls(operator.clone())?;
        let flags = [
            "--admin-tls-cert-file",
            path(&server_cert),
            "--admin-tls-key-file",
            path(&server_key),
            "--admin-tls-client-ca-file",
            path(&ca_file),
        ];
        // The joins run over mTLS too.
        c.bootstrap(&flags)?;
        c.join(0, &flags)?;
        c.join(0, &flags)?;
        c.wait_converged(3).await?;
        let leader = c.wait_leader().await?;
        let follower = (leader + 1) % 3;

        // A write through a follower is forwarded to the leader's https admin API.
        c.apply_retrying(follower, &objective("over-mtls", 4))
            .await?;
        c.wait_everywhere("over-mtls", 4).await?;
        // Every node registered itself (its first write, through the leader, over mTLS).
        wait_for("three registry entries", || async {
            let status = c.status(follower).await.ok()?;
            (status["registry"].as_object()?.len() == 3).then_some(())
        })
        .await?;

        // Refused: plaintext, no client certificate, another CA's, an expired one.
        let addr = c.nodes[follower].admin.clone();
        let plain = AdminClient::new(&format!("http://{addr}"), Some(TOKEN.into()))?;
        ensure!(refused(&plain).await, "a plaintext client was served");
        let url = c.url(follower);
        let anonymous = AdminClient::with_tls(
            &url,
            Some(TOKEN.into()),
            &AdminTls {
                ca_file: Some(ca_file.clone()),
                ..AdminTls::default()
            },
        )?;
        ensure!(
            refused(&anonymous).await,
            "a client without a certificate was served"
        );
        for (what, cert, key) in [
            ("another CA's", &alien_cert, &alien_key),
            ("an expired", &old_cert, &old_key),
        ] {
            let cl = AdminClient::with_tls(
                &url,
                Some(TOKEN.into()),
                &AdminTls {
                    ca_file: Some(ca_file.clone()),
                    cert_file: Some(cert.clone()),
                    key_file: Some(key.clone()),
                },
            )?;
            ensure!(
                refused(&cl).await,
                "a client with {what} certificate was served"
            );
        }
        // The same client with the right certificate is served (so the refusals above are
        // about the certificates, not the address).
        ensure!(!refused(&c.admin(follower)).await);

        // The CLI over mTLS.
        let (ok, out, err) = cli(&[
            "policy",
            "get",
            "InferenceObjective",
            "--server",
            &url,
            "--ca-file",
            path(&ca_file),
            "--cert-file",
            path(&op_cert),
            "--key-file",
            path(&op_key),
        ])?;
        ensure!(
            ok && out.contains("over-mtls"),
            "stdout: {out}\nstderr: {err}"
        );
        Ok(())
    })
}

#[test]
fn read_and_write_tokens_are_apart_and_rotate_through_policy() -> Result<()> {
    run(async {
        let c = Cluster::start(3).await?;
        let leader = c.wait_leader().await?;
        let follower = (leader + 1) % 3;
        let url = |i: usize| c.url(i);
        let write_file = c.dir().join("write-token");
        std::fs::write(&write_file, format!("{TOKEN}\n"))?;
        let token_file = |name: &str, token: &str| -> Result<PathBuf> {
            let p = c.dir().join(name);
            std::fs::write(&p, format!("# {name}\n{token}\n"))?;
            Ok(p)
        };

        // Reads are open while no read token exists.
        c.client_as(follower, None)
            .call(Method::GET, "/v1/policy", None)
            .await?;

        // A read token, added with the CLI through a follower.
        let reader = token_file("reader", "reader-secret-1")?;
        let (ok, out, err) = tokens_cli("add", "read", &reader, &url(follower), &write_file)?;
        ensure!(ok, "tokens add: {out}{err}");
        for i in c.running() {
            wait_for(&format!("node {i} to ask reads for a token"), || async {
                let e = c
                    .client_as(i, None)
                    .call(Method::GET, "/v1/policy", None)
                    .await
                    .err()?;
                (e.status() == Some(StatusCode::UNAUTHORIZED)).then_some(())
            })
            .await?;
        }
        // The join handshake stays open.
        c.client_as(follower, None)
            .call(Method::GET, "/v1/node", None)
            .await?;
        let read_client = c.client_as(follower, Some("reader-secret-1"));
        read_client
            .call(Method::GET, "/v1/policy/InferenceObjective", None)
            .await?;
        read_client
            .call(Method::GET, "/v1/cluster/status", None)
            .await?;
        // A read token cannot write, delete, or see the tokens.
        let err = read_client
            .call(
                Method::POST,
                "/v1/policy",
                Some(objective("by-reader", 1).into_bytes()),
            )
            .await
            .expect_err("a read token wrote");
        ensure!(err.status() == Some(StatusCode::FORBIDDEN), "{err}");
        let err = read_client
            .call(Method::GET, "/v1/tokens", None)
            .await
            .expect_err("a read token listed the tokens");
        ensure!(err.status() == Some(StatusCode::FORBIDDEN), "{err}");
        let err = c
            .client_as(follower, Some("not-a-token"))
            .call(Method::GET, "/v1/policy", None)
            .await
            .expect_err("an unknown token read");
        ensure!(err.status() == Some(StatusCode::UNAUTHORIZED), "{err}");
        // A write token reads too.
        c.admin(follower)
            .call(Method::GET, "/v1/policy", None)
            .await?;

        // Rotation step 1: the new write token joins the old one.
        let next = token_file("next", "writer-secret-2")?;
        let (ok, out, err) = tokens_cli("add", "write", &next, &url(follower), &write_file)?;
        ensure!(ok, "tokens add: {out}{err}");
        let (ok, listed, err) = cli(&[
            "tokens",
            "list",
            "-o",
            "json",
            "--server",
            &url(leader),
            "--token-file",
            path(&next),
        ])?;
        ensure!(ok, "tokens list: {listed}{err}");
        let listed: serde_json::Value = serde_json::from_str(&listed)?;
        ensure!(
            listed["write"].as_array().map(Vec::len) == Some(2)
                && listed["read"].as_array().map(Vec::len) == Some(1),
            "{listed}"
        );
        for i in c.running() {
            wait_for(&format!("node {i} to accept the new token"), || async {
                c.client_as(i, Some("writer-secret-2"))
                    .call(Method::GET, "/v1/tokens", None)
                    .await
                    .ok()
                    .map(|_| ())
            })
            .await?;
        }
        // Step 2: clients move; the old token is removed with the new one.
        let (ok, out, err) = tokens_cli("remove", "write", &write_file, &url(follower), &next)?;
        ensure!(ok, "tokens remove: {out}{err}");
        for i in c.running() {
            wait_for(&format!("node {i} to refuse the old token"), || async {
                let e = c
                    .admin(i)
                    .call(
                        Method::POST,
                        "/v1/policy",
                        Some(objective("old", 1).into_bytes()),
                    )
                    .await
                    .err()?;
                (e.status() == Some(StatusCode::UNAUTHORIZED)).then_some(())
            })
            .await?;
        }
        c.client_as(follower, Some("writer-secret-2"))
            .call(
                Method::POST,
                "/v1/policy",
                Some(objective("with-new-token", 2).into_bytes()),
            )
            .await?;
        // The last write token cannot go, and an unknown hash is named.
        let (ok, _, err) = tokens_cli("remove", "write", &next, &url(leader), &next)?;
        ensure!(!ok && err.contains("last write token"), "{err}");
        let (ok, _, err) = cli(&[
            "tokens",
            "remove",
            "--role",
            "read",
            "--hash",
            &format!("sha256:{}", "ab".repeat(32)),
            "--server",
            &url(leader),
            "--token-file",
            path(&next),
        ])?;
        ensure!(!ok && err.contains("is not a read token"), "{err}");
        ensure!(
            c.client_as(leader, Some("writer-secret-2"))
                .call(Method::GET, "/v1/policy/InferenceObjective/old", None)
                .await
                .err()
                .and_then(|e| e.status())
                == Some(StatusCode::NOT_FOUND),
            "a write with the removed token was applied"
        );
        Ok(())
    })
}
