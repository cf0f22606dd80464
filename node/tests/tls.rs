//! TLS and mTLS on the node's gRPC port (ext_proc, ADS, health): real Envoy talks mTLS to
//! ext_proc and routes; a plaintext client, a client without a certificate, one whose
//! certificate another CA signed and one whose certificate has expired are refused; a
//! server certificate rotated on disk under traffic (`--enable-cert-reload`) is served to
//! new connections with no failed request. The proxy's client side serves TLS and mTLS
//! with its own certificate, refuses plaintext and certificate-less clients, and reloads
//! its certificate too.

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use infermesh_node::tls::{Alpn, ServerTlsSettings, TlsVersion};
use infermesh_testkit::certs::{Leaf, TestCa};
use infermesh_testkit::envoy::{EnvoyClientTls, ExtProcEnvoy, envoy_bin};
use support::{Harness, post};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

struct Pki {
    dir: tempfile::TempDir,
    ca: TestCa,
    ca_file: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client: Leaf,
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("infermesh test CA");
    let ca_file = ca.write(dir.path(), "ca").unwrap();
    let (server_cert, server_key) = ca
        .leaf("server-1", false)
        .write(dir.path(), "server")
        .unwrap();
    let client = ca.leaf("envoy", false);
    Pki {
        dir,
        ca,
        ca_file,
        server_cert,
        server_key,
        client,
    }
}

fn settings(p: &Pki, reload: bool) -> ServerTlsSettings {
    ServerTlsSettings {
        cert: p.server_cert.clone(),
        key: p.server_key.clone(),
        client_ca: Some(p.ca_file.clone()),
        min_version: TlsVersion::Tls12,
        cipher_suites: Vec::new(),
        reload,
        alpn: Alpn::Grpc,
    }
}

/// A gRPC health check over a fresh connection with `identity` (or none) trusting `ca`.
async fn check(
    addr: std::net::SocketAddr,
    ca: &str,
    identity: Option<&Leaf>,
    plaintext: bool,
) -> Result<(), String> {
    let scheme = if plaintext { "http" } else { "https" };
    let mut ep = Channel::from_shared(format!("{scheme}://{addr}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(2));
    if !plaintext {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .domain_name("localhost");
        if let Some(l) = identity {
            tls = tls.identity(Identity::from_pem(&l.cert, &l.key));
        }
        ep = ep.tls_config(tls).map_err(|e| e.to_string())?;
    }
    let channel = ep.connect().await.map_err(|e| format!("connect: {e:?}"))?;
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: "liveness".into(),
        })
        .await
        .map(|_| ())
        .map_err(|e| format!("check: {e}"))
}

/// The server certificate a fresh handshake is given (DER).
async fn served_cert(addr: std::net::SocketAddr, ca: &Path, client: &Leaf) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let chain: Vec<_> = CertificateDer::pem_slice_iter(client.cert.as_bytes())
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_slice(client.key.as_bytes()).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn der_of(pem: &str) -> Vec<u8> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_admits_only_clients_the_ca_signed_and_that_are_valid() {
    let p = pki();
    let s = settings(&p, false);
    let h = Harness::start_with(1, false, |c| c.grpc_tls = Some(s)).await;
    let addr = h.node.ext_proc_addr;
    let ca = p.ca.pem();

    check(addr, &ca, Some(&p.client), false)
        .await
        .expect("a client the CA signed is served");

    let plaintext = check(addr, &ca, None, true).await;
    assert!(plaintext.is_err(), "plaintext was served");
    let anonymous = check(addr, &ca, None, false).await;
    assert!(
        anonymous.is_err(),
        "a client without a certificate was served"
    );
    let other_ca = TestCa::new("another CA").leaf("intruder", false);
    assert!(
        check(addr, &ca, Some(&other_ca), false).await.is_err(),
        "a client another CA signed was served"
    );
    let expired = p.ca.leaf("expired", true);
    assert!(
        check(addr, &ca, Some(&expired), false).await.is_err(),
        "an expired client certificate was served"
    );
    // And the server still serves a good client after all that.
    check(addr, &ca, Some(&p.client), false).await.unwrap();
    h.stop().await;
}

/// One completion through the proxy at `addr` over https, as `tls` says; the status, or
/// why the exchange failed.
async fn proxied_completion(
    addr: std::net::SocketAddr,
    tls: &infermesh_node::admin::client::AdminTls,
    model: &str,
) -> Result<u16, String> {
    use http_body_util::{BodyExt, Full};
    let client =
        infermesh_node::upstream::https_client_with(tls.client_config()?, Duration::from_secs(2));
    let body = serde_json::json!({"model": model, "prompt": "hello", "max_tokens": 2});
    let req = http::Request::post(format!("https://{addr}/v1/completions"))
        .header("content-type", "application/json")
        .body(Full::new(bytes::Bytes::from(body.to_string())))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .map_err(|_| "no answer".to_string())?
        .map_err(|e| format!("{e:?}"))?;
    let status = resp.status().as_u16();
    let _ = resp.into_body().collect().await;
    Ok(status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_serves_clients_over_mtls_and_refuses_the_others() {
    use infermesh_node::admin::client::AdminTls;
    let p = pki();
    // Its own certificate: the proxy's settings are apart from the gRPC port's.
    let (cert, key) =
        p.ca.leaf("proxy", false)
            .write(p.dir.path(), "proxy")
            .unwrap();
    let proxy_tls = ServerTlsSettings {
        cert: cert.clone(),
        key: key.clone(),
        alpn: Alpn::Http,
        ..settings(&p, true)
    };
    let h = Harness::start_with(2, false, |c| c.proxy_tls = Some(proxy_tls)).await;
    let addr = h.node.proxy_addr.expect("the proxy listens");
    let (client_cert, client_key) = p.client.write(p.dir.path(), "client").unwrap();
    let trusted = AdminTls {
        ca_file: Some(p.ca_file.clone()),
        cert_file: Some(client_cert),
        key_file: Some(client_key),
    };
    for _ in 0..3 {
        assert_eq!(
            proxied_completion(addr, &trusted, &h.model).await,
            Ok(200),
            "an mTLS client through the proxy"
        );
    }
    let anonymous = AdminTls {
        ca_file: Some(p.ca_file.clone()),
        ..AdminTls::default()
    };
    assert!(
        proxied_completion(addr, &anonymous, &h.model)
            .await
            .is_err(),
        "a client without a certificate was served"
    );
    // Plaintext HTTP to the TLS port gets no HTTP answer.
    let plain = support::send(
        &h.client,
        http::Request::post(format!("http://{addr}/v1/completions"))
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
            .unwrap(),
    )
    .await;
    assert!(
        plain.is_err(),
        "a plaintext client was answered: {:?}",
        plain.map(|r| r.status)
    );

    // The proxy's certificate rotates on disk like the gRPC port's.
    let next = p.ca.leaf("proxy-2", false);
    let (c2, k2) = next.write(p.dir.path(), "proxy-next").unwrap();
    std::fs::rename(&k2, &key).unwrap();
    std::fs::rename(&c2, &cert).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while served_cert(addr, &p.ca_file, &p.client).await != der_of(&next.cert) {
        assert!(
            Instant::now() < deadline,
            "the rotated proxy certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        proxied_completion(addr, &trusted, &h.model).await,
        Ok(200),
        "a request after the rotation"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_is_served_under_traffic_without_a_failed_request() {
    let p = pki();
    let s = settings(&p, true);
    let h = Harness::start_with(1, false, |c| c.grpc_tls = Some(s)).await;
    let addr = h.node.ext_proc_addr;
    let ca = p.ca.pem();
    let first = std::fs::read_to_string(&p.server_cert).unwrap();
    assert_eq!(
        served_cert(addr, &p.ca_file, &p.client).await,
        der_of(&first)
    );

    // Traffic: each request on a fresh connection (a new handshake every time), and one
    // long-lived connection, until told to stop; bounded by count.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let traffic = {
        let (stop, ok, failed, ca, client) = (
            stop.clone(),
            ok.clone(),
            failed.clone(),
            ca.clone(),
            p.client.clone(),
        );
        tokio::spawn(async move {
            for _ in 0..5_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                match check(addr, &ca, Some(&client), false).await {
                    Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        eprintln!("request failed: {e}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        })
    };
    let long_lived = {
        let ep = Channel::from_shared(format!("https://{addr}"))
            .unwrap()
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(&ca))
                    .identity(Identity::from_pem(&p.client.cert, &p.client.key))
                    .domain_name("localhost"),
            )
            .unwrap();
        HealthClient::new(ep.connect().await.unwrap())
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Rotate: a new key and certificate, each file replaced whole.
    let next = p.ca.leaf("server-2", false);
    let (c2, k2) = next.write(p.dir.path(), "next").unwrap();
    std::fs::rename(&k2, &p.server_key).unwrap();
    std::fs::rename(&c2, &p.server_cert).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if served_cert(addr, &p.ca_file, &p.client).await == der_of(&next.cert) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the rotated certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let at_rotation = ok.load(Ordering::Relaxed);
    // Keep the traffic going a while on the new certificate.
    let until = Instant::now() + Duration::from_secs(10);
    while ok.load(Ordering::Relaxed) < at_rotation + 20 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    traffic.await.unwrap();
    // The connection opened before the rotation still works.
    let mut long_lived = long_lived;
    long_lived
        .check(HealthCheckRequest {
            service: "liveness".into(),
        })
        .await
        .expect("a connection from before the rotation");
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests failed during the rotation"
    );
    assert!(
        ok.load(Ordering::Relaxed) > at_rotation,
        "no request after the rotation"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_routes_through_an_mtls_ext_proc() {
    let p = pki();
    let (ccert, ckey) = p.client.write(p.dir.path(), "envoy").unwrap();
    let s = settings(&p, false);
    let h = Harness::start_with(2, false, |c| c.grpc_tls = Some(s)).await;
    let tls = EnvoyClientTls {
        ca: p.ca_file.clone(),
        cert: ccert,
        key: ckey,
        sni: "localhost".into(),
    };
    let envoy =
        ExtProcEnvoy::start_with_tls(&envoy_bin(), h.node.ext_proc_addr, &h.pods, Some(&tls))
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
    let body = serde_json::json!({
        "model": h.model,
        "messages": [{"role": "user", "content": "hello over mTLS"}],
        "max_tokens": 4,
    });
    for _ in 0..5 {
        let r = post(
            &h.client,
            envoy.addr,
            "/v1/chat/completions",
            body.to_string(),
            &[],
        )
        .await;
        assert_eq!(r.status, 200, "{:?}\n{}", r.body, envoy.log_tail());
        let picked = r.header("x-gateway-destination-endpoint");
        let served = r.header("x-upstream-host");
        assert!(served.is_some(), "no upstream host: {picked:?}");
    }
    drop(envoy);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_takes_ads_over_mtls_and_its_cds_ext_proc_cluster_speaks_mtls() {
    let p = pki();
    let (ccert, ckey) = p.client.write(p.dir.path(), "envoy").unwrap();
    let files = infermesh_xds::UpstreamTlsFiles {
        ca_file: p.ca_file.display().to_string(),
        cert_file: ccert.display().to_string(),
        key_file: ckey.display().to_string(),
        sni: "localhost".into(),
    };
    let listener = std::net::SocketAddr::from(([127, 0, 0, 1], support::free_port()));
    let s = settings(&p, false);
    let tls = files.clone();
    let h = Harness::start_with(2, false, move |c| {
        c.grpc_tls = Some(s);
        c.xds.file_pool.listener = listener;
        c.xds.server.ext_proc_tls = Some(tls);
    })
    .await;
    let envoy = infermesh_testkit::envoy::Envoy::start_with_tls(
        "envoy-mtls",
        "GRPC",
        &[h.node.xds_addr],
        Some(files),
    )
    .await
    .expect("envoy starts");
    let body = serde_json::json!({
        "model": h.model,
        "messages": [{"role": "user", "content": "hello over ADS and mTLS"}],
        "max_tokens": 4,
    })
    .to_string();
    // The listener and clusters arrive over mTLS ADS; the request's ext_proc call goes over
    // the CDS-served cluster, which must speak mTLS too or the node refuses it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last;
    loop {
        let req = http::Request::post(format!("http://{listener}/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(body.clone())))
            .unwrap();
        match support::send(&h.client, req).await {
            Ok(r) if r.status == 200 => break,
            Ok(r) => last = format!("{} {:?}", r.status, r.body),
            Err(e) => last = e,
        }
        assert!(
            Instant::now() < deadline,
            "no completion through Envoy's ADS listener: {last}\n{}",
            envoy.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(envoy);
    h.stop().await;
}

#[test]
fn the_shipped_mtls_ads_bootstrap_is_what_the_binary_prints() {
    let path = infermesh_testkit::workspace_dir().join("deploy/envoy/envoy-ads-mtls.yaml");
    let shipped: serde_json::Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut o = infermesh_xds::BootstrapOptions::new("envoy", vec!["infermesh-mesh:9002".into()]);
    o.admin = "0.0.0.0:9901".parse().unwrap();
    o.tls = Some(infermesh_xds::UpstreamTlsFiles {
        ca_file: "/etc/envoy/tls/ca.crt".into(),
        cert_file: "/etc/envoy/tls/tls.crt".into(),
        key_file: "/etc/envoy/tls/tls.key".into(),
        sni: "infermesh.infermesh.svc".into(),
    });
    assert_eq!(shipped, infermesh_xds::envoy_bootstrap(&o).unwrap());
}
