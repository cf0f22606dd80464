//! Integration with a real Envoy 1.40, in SotW and Delta ADS modes, against two
//! in-process xDS servers (two "nodes"):
//! Envoy receives its listener; a request through it reaches the backend a tiny ext_proc
//! picker chose; one xDS server is killed and Envoy keeps routing and reconnects to the
//! other without being pushed anything; a membership change moves ext_proc traffic; a
//! policy change (new port, failure mode) reaches Envoy and a fail-open pool keeps serving
//! without pickers; an invalid resource is NACKed and the previous configuration keeps
//! serving.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use infermesh_testkit::ads::{in_sync, status_of};
use infermesh_testkit::envoy::Envoy;
use infermesh_testkit::{block_on, free_port, http_get, wait_for};
use infermesh_xds::{FailureMode, InferencePoolSpec, ResourceType, XdsInput};
use support::{PickerNode, XdsNode, start_backend};

const WAIT: Duration = Duration::from_secs(30);

/// A pool of `backends` (one IP, a target port each): the override-host policy only sends
/// a request to a picked endpoint that is in the pool.
fn pool(port: u16, backends: &[SocketAddr]) -> InferencePoolSpec {
    let mut p = InferencePoolSpec::new(
        "llama",
        ([127, 0, 0, 1], port).into(),
        backends.iter().map(SocketAddr::port).collect(),
    );
    p.endpoints = vec![backends[0].ip()];
    p
}

async fn get_ok(addr: SocketAddr) -> Option<String> {
    match http_get(addr, "/v1/models").await {
        Ok((200, body)) => Some(body),
        _ => None,
    }
}

async fn scenario(api_type: &str) {
    let node_id = format!("envoy-{}", api_type.to_ascii_lowercase());
    let backend_a = start_backend("backend-a").await;
    let backend_b = start_backend("backend-b").await;
    let mut picker_1 = PickerNode::start("picker-1", backend_a).await;
    let mut picker_2 = PickerNode::start("picker-2", backend_b).await;
    let mut nodes = [XdsNode::start().await, XdsNode::start().await];

    let port = free_port();
    let mut input = XdsInput {
        pools: vec![pool(port, &[backend_a, backend_b])],
        ext_proc_endpoints: vec![picker_1.addr, picker_2.addr],
        grpc_services: vec![],
    };
    for n in &nodes {
        n.server.publish(&input).expect("publish");
    }
    wait_for("both nodes to serve the snapshot", WAIT, || async {
        nodes
            .iter()
            .all(|n| n.server.current().is_some())
            .then_some(())
    })
    .await;
    let v0 = nodes[0].server.current().unwrap().versions();
    assert_eq!(
        v0,
        nodes[1].server.current().unwrap().versions(),
        "same input, same versions on every node"
    );

    let envoy = Envoy::start(&node_id, api_type, &[nodes[0].addr, nodes[1].addr])
        .await
        .expect("envoy");
    let listener: SocketAddr = ([127, 0, 0, 1], port).into();

    // 1. The listener arrives and a request reaches the backend the picker chose.
    let body = wait_for("a request through Envoy's xDS listener", WAIT, || {
        get_ok(listener)
    })
    .await;
    assert!(
        body.contains("pool=llama"),
        "the ext_proc stream names its pool: {body}"
    );
    wait_for(
        "both pickers (and so both backends) to be used",
        WAIT,
        || async {
            let mut seen = (false, false);
            for _ in 0..20 {
                let b = get_ok(listener).await?;
                seen.0 |= b.starts_with("backend-a picked-by=picker-1");
                seen.1 |= b.starts_with("backend-b picked-by=picker-2");
            }
            (seen.0 && seen.1).then_some(())
        },
    )
    .await;

    // 2. Kill the xDS server Envoy is connected to: Envoy keeps routing and reconnects to
    //    the other, which has nothing to push.
    let connected = wait_for("Envoy in sync with one node", WAIT, || async {
        nodes.iter().position(|n| in_sync(&n.server, &node_id))
    })
    .await;
    let other = 1 - connected;
    assert!(
        status_of(&nodes[other].server, &node_id).is_none(),
        "Envoy holds one ADS stream"
    );
    nodes[connected].kill();
    for _ in 0..10 {
        assert!(
            get_ok(listener).await.is_some(),
            "Envoy keeps routing while its xDS server is gone"
        );
    }
    wait_for("Envoy to reconnect to the surviving node", WAIT, || async {
        in_sync(&nodes[other].server, &node_id).then_some(())
    })
    .await;
    let st = status_of(&nodes[other].server, &node_id).unwrap();
    for t in &st.types {
        assert!(
            t.last_sent.is_none(),
            "needless push of {:?} on reconnect: {t:?}",
            t.ty
        );
    }
    let survivor = &nodes[other].server;
    assert!(get_ok(listener).await.is_some());

    // 3. Membership change: picker-1 leaves; Envoy stops using it before it dies.
    input.ext_proc_endpoints = vec![picker_2.addr];
    survivor.publish(&input).unwrap();
    let eds = wait_for("the new ext_proc endpoints to be ACKed", WAIT, || async {
        let cur = survivor
            .current()?
            .get(ResourceType::Endpoint)
            .version
            .clone();
        let st = status_of(survivor, &node_id)?;
        let t = &st.types[ResourceType::Endpoint as usize];
        (t.in_sync && t.last_acked.as_ref()?.version == cur).then_some(cur)
    })
    .await;
    assert_ne!(eds, v0[ResourceType::Endpoint as usize]);
    picker_1.kill();
    for _ in 0..20 {
        let body = get_ok(listener).await.expect("routing after a node left");
        assert!(body.starts_with("backend-b picked-by=picker-2"), "{body}");
    }

    // 4. Policy change: the pool moves to a new port and fails open.
    let new_port = free_port();
    input.pools = vec![pool(new_port, &[backend_a])];
    input.pools[0].failure_mode = FailureMode::FailOpen;
    survivor.publish(&input).unwrap();
    let moved: SocketAddr = ([127, 0, 0, 1], new_port).into();
    wait_for("the pool on its new port", WAIT, || get_ok(moved)).await;
    wait_for("the old port to close", WAIT, || async {
        http_get(listener, "/").await.is_err().then_some(())
    })
    .await;
    let dump = envoy.listeners_dump().await.unwrap();
    assert!(
        dump.contains("\"failure_mode_allow\": true"),
        "FailOpen reached Envoy:\n{dump}"
    );
    // Failing open: with no picker reachable, requests go to the pool's own endpoints.
    picker_2.kill();
    wait_for(
        "fail-open routing to the pool's endpoints",
        WAIT,
        || async { get_ok(moved).await.filter(|b| b == "backend-a picked-by=") },
    )
    .await;

    // 5. An invalid resource (a listener on a port already taken) is NACKed; the previous
    //    configuration keeps serving and the reason is visible.
    let taken = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    let good = input.clone();
    let mut bad = input.clone();
    let mut extra = pool(taken_port, &[backend_b]);
    extra.name = "busy".into();
    bad.pools.push(extra);
    survivor.publish(&bad).unwrap();
    let nack = wait_for("Envoy to NACK the listener", WAIT, || async {
        let st = status_of(survivor, &node_id)?;
        st.types[ResourceType::Listener as usize].nack.clone()
    })
    .await;
    assert!(!nack.detail.message.is_empty(), "NACK reason exposed");
    let bad_lds = survivor
        .current()
        .unwrap()
        .get(ResourceType::Listener)
        .version
        .clone();
    assert_eq!(nack.detail.version, bad_lds);
    for _ in 0..10 {
        assert!(
            get_ok(moved).await.is_some(),
            "previous config keeps serving after a NACK"
        );
    }
    let st = status_of(survivor, &node_id).unwrap();
    let lds = &st.types[ResourceType::Listener as usize];
    assert!(!lds.in_sync);
    assert_eq!(
        lds.nacks_total, 1,
        "the NACKed version is not pushed again: {lds:?}"
    );
    assert_ne!(lds.last_acked.as_ref().unwrap().version, bad_lds);

    // Fixing the input brings Envoy back in sync.
    drop(taken);
    survivor.publish(&good).unwrap();
    wait_for("Envoy back in sync after the fix", WAIT, || async {
        in_sync(survivor, &node_id).then_some(())
    })
    .await;
    assert!(get_ok(moved).await.is_some());
    drop(envoy);
}

#[test]
fn envoy_sotw_ads() {
    block_on(scenario("GRPC"));
}

#[test]
fn envoy_delta_ads() {
    block_on(scenario("DELTA_GRPC"));
}
