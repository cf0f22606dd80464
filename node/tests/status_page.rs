//! The live status page in a real headless browser: a 3-node tier (mesh + Raft policy
//! store, each node on its own killable runtime) in front of simulated pods; Chromium opens
//! one node's `/status`, which must show the three members and the Raft leader, then a
//! node is killed and the open page must drop it by itself (server-sent events, no
//! reload). Screenshots go to `$STATUS_PAGE_SHOTS` (default `target/status-page/`).
//!
//! Needs Chromium and chromedriver (`scripts/setup-test-deps.sh`); fails, never skips,
//! without them.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use infermesh_gossip::ClusterKey;
use infermesh_sim::{EngineProfile, Fleet, FleetConfig};
use infermesh_testkit::{free_port, wait_for};
use support::browser::Browser;
use support::post;
use support::tier::{Node, cluster_args, node_config};

const WAIT: Duration = Duration::from_secs(30);

fn shots() -> PathBuf {
    std::env::var_os("STATUS_PAGE_SHOTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../target/status-page"
            ))
        })
}

/// What the page shows now: members count, leader, connection state, member rows.
async fn shown(b: &Browser) -> (String, String, String, Vec<String>) {
    let v = b
        .eval(
            "return [document.getElementById('members-count').textContent, \
             document.getElementById('leader').textContent, \
             document.getElementById('conn').textContent, \
             [...document.querySelectorAll('#members tbody tr')].map(r => r.dataset.member)];",
        )
        .await;
    let s = |i: usize| v[i].as_str().unwrap_or_default().to_owned();
    let rows = v[3]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    (s(0), s(1), s(2), rows)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_the_tier_and_follows_a_kill() {
    let mut fc = FleetConfig::new(2);
    fc.profile = EngineProfile::instant();
    let model = fc.model.clone();
    let fleet = Fleet::start(fc).await.expect("pods");
    let pods = fleet.addrs();
    let key = ClusterKey::new(b"status-page-test-cluster-key".to_vec()).unwrap();
    let listener = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "status-page-token\n").unwrap();
    let mut viewed = node_config("page-a", &pods, &model, listener, &key, vec![]);
    viewed.proxy_addr = Some("127.0.0.1:0".parse().unwrap());
    let first = Node::start(viewed, cluster_args(&dir.path().join("a"), &tokens, None)).await;
    let seed = first.app().mesh().expect("mesh").gossip_addr();
    let mut nodes = vec![first];
    for name in ["page-b", "page-c"] {
        let n = Node::start(
            node_config(name, &pods, &model, listener, &key, vec![seed]),
            cluster_args(&dir.path().join(name), &tokens, Some(nodes[0].admin())),
        )
        .await;
        nodes.push(n);
    }
    for n in &nodes {
        assert!(n.app().wait_ready(2, WAIT).await, "pods scraped");
    }
    // Some traffic through the viewed node, so the rates have something to show.
    let client = infermesh_node::upstream::http_client(Duration::from_secs(5));
    let proxy = nodes[0].app().proxy_addr.expect("proxy on the viewed node");

    let browser = Browser::start().await;
    let page = format!(
        "http://{}/status",
        nodes[0].app().metrics_addr.expect("metrics port")
    );
    browser.open(&page).await;
    let (_, leader, _, rows) = wait_for("the page shows 3 members and a leader", WAIT, || async {
        let s = shown(&browser).await;
        (s.0 == "3" && s.2 == "live" && s.1.starts_with("page-") && s.3.len() == 3).then_some(s)
    })
    .await;
    assert!(
        rows.contains(&leader),
        "the leader {leader} is one of {rows:?}"
    );
    // Traffic until the page's rate and TTFT cards show it (bounded: 30 s at most).
    let mut sent = 0;
    let rps = wait_for("the page shows the request rate and TTFT", WAIT, || {
        sent += 1;
        let body = serde_json::json!({"model": model, "prompt": format!("status page {sent}"), "max_tokens": 4});
        let (client, browser) = (&client, &browser);
        async move {
            let r = post(client, proxy, "/v1/completions", body.to_string(), &[]).await;
            assert_eq!(r.status, 200);
            tokio::time::sleep(Duration::from_millis(50)).await;
            let v = browser
                .eval("return [document.getElementById('rps').textContent, document.getElementById('ttft').textContent];")
                .await;
            let rps: f64 = v[0].as_str()?.parse().ok()?;
            (rps > 0.0 && v[1].as_str()?.ends_with(" ms")).then_some(rps)
        }
    })
    .await;
    assert!(rps > 0.0);
    browser.screenshot(&shots().join("tier-of-3.png")).await;

    // Kill a node that is neither the viewed one nor the leader.
    let victim = (1..nodes.len())
        .find(|&i| {
            nodes[i]
                .app()
                .mesh()
                .map(|m| m.node_id().as_str().to_owned())
                != Some(leader.clone())
        })
        .expect("a follower to kill");
    let victim_name = nodes[victim]
        .app()
        .mesh()
        .unwrap()
        .node_id()
        .as_str()
        .to_owned();
    nodes[victim].kill();
    let (count, _, conn, rows) = wait_for("the open page drops the killed node", WAIT, || async {
        let s = shown(&browser).await;
        (s.0 == "2").then_some(s)
    })
    .await;
    assert_eq!(conn, "live", "updated by the event stream, not a reload");
    assert_eq!(count, "2");
    assert!(
        !rows.contains(&victim_name),
        "{victim_name} still listed: {rows:?}"
    );
    browser.screenshot(&shots().join("after-a-kill.png")).await;
    drop(browser);
    drop(nodes);
    fleet.shutdown().await;
}
