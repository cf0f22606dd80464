//! Engine tests: the SotW and Delta stream state machines driven by plain method calls,
//! no sockets, no clocks.

use std::collections::HashMap;
use std::sync::Arc;

use infermesh_proto::envoy::config::core::v3::Node;
use infermesh_proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use infermesh_proto::google::rpc::Status;
use infermesh_xds::translate::translate;
use infermesh_xds::{
    DeltaStream, FailureMode, InferencePoolSpec, NodeMemory, ResourceType, Snapshot, SotwStream,
    StreamEvent, XdsConfig, XdsInput,
};
use prost::Message;

const LDS: ResourceType = ResourceType::Listener;
const CDS: ResourceType = ResourceType::Cluster;
const EDS: ResourceType = ResourceType::Endpoint;
const RDS: ResourceType = ResourceType::Route;

fn input(ports: &[u16], nodes: &[u16]) -> XdsInput {
    XdsInput {
        pools: ports
            .iter()
            .enumerate()
            .map(|(i, p)| {
                InferencePoolSpec::new(format!("pool-{i}"), ([127, 0, 0, 1], *p).into(), vec![8000])
            })
            .collect(),
        ext_proc_endpoints: nodes.iter().map(|p| ([127, 0, 0, 1], *p).into()).collect(),
        grpc_services: vec!["epp".into()],
    }
}

fn snap(input: &XdsInput) -> Arc<Snapshot> {
    Arc::new(Snapshot::build(&translate(input, &XdsConfig::default())).unwrap())
}

fn req(ty: ResourceType, version: &str, nonce: &str, names: &[&str]) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: version.into(),
        node: Some(Node {
            id: "envoy-1".into(),
            ..Default::default()
        }),
        resource_names: names.iter().map(|n| n.to_string()).collect(),
        type_url: ty.type_url().into(),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

fn nack(mut r: DiscoveryRequest, message: &str) -> DiscoveryRequest {
    r.error_detail = Some(Status {
        code: 3,
        message: message.into(),
        details: vec![],
    });
    r
}

fn poll_sotw(s: &mut SotwStream) -> Option<(ResourceType, DiscoveryResponse)> {
    s.poll_response().map(|(ty, r)| {
        (
            ty,
            DiscoveryResponse::decode(r.to_vec().as_slice()).unwrap(),
        )
    })
}

fn events(s: &mut SotwStream) -> Vec<StreamEvent> {
    std::iter::from_fn(|| s.poll_event()).collect()
}

#[test]
fn sotw_nothing_is_served_before_the_first_publish() {
    let mut s = SotwStream::new(None, NodeMemory::default());
    s.handle_request(&req(LDS, "", "", &[]));
    assert!(s.poll_response().is_none());
    s.handle_snapshot(snap(&input(&[10000], &[9002])));
    let (ty, r) = poll_sotw(&mut s).unwrap();
    assert_eq!(ty, LDS);
    assert_eq!(
        r.resources.len(),
        1,
        "wildcard gets the pool listener, not the API listener"
    );
}

#[test]
fn sotw_ack_push_stale_and_nack() {
    let first = snap(&input(&[10000], &[9002]));
    let mut s = SotwStream::new(Some(first.clone()), NodeMemory::default());
    s.handle_request(&req(LDS, "", "", &[]));
    let (_, r1) = poll_sotw(&mut s).unwrap();
    assert_eq!(r1.version_info, first.get(LDS).version);
    assert!(
        s.poll_response().is_none(),
        "one response in flight per type"
    );
    s.handle_request(&req(LDS, &r1.version_info, &r1.nonce, &[]));
    assert!(matches!(
        events(&mut s).as_slice(),
        [StreamEvent::Sent { .. }, StreamEvent::Acked { .. }]
    ));
    assert!(s.poll_response().is_none(), "ACKed: nothing to send");

    // New listener port: pushed.
    let second = snap(&input(&[10001], &[9002]));
    s.handle_snapshot(second.clone());
    let (_, r2) = poll_sotw(&mut s).unwrap();
    assert_eq!(r2.version_info, second.get(LDS).version);
    // A request answering the older response is stale and ignored.
    s.handle_request(&req(LDS, &r1.version_info, &r1.nonce, &[]));
    assert!(
        events(&mut s)
            .iter()
            .any(|e| matches!(e, StreamEvent::StaleNonce { .. }))
    );
    assert!(s.poll_response().is_none());
    // NACK: the client keeps r1; r2 is not pushed again.
    s.handle_request(&nack(
        req(LDS, &r1.version_info, &r2.nonce, &[]),
        "cannot bind",
    ));
    let ev = events(&mut s);
    let Some(StreamEvent::Nacked { detail, .. }) = ev.last() else {
        panic!("expected a NACK event, got {ev:?}")
    };
    assert_eq!(detail.message, "cannot bind");
    assert_eq!(detail.version, r2.version_info);
    assert!(
        s.poll_response().is_none(),
        "a NACKed version is not re-pushed"
    );
    assert_eq!(
        s.synced_version(LDS),
        None,
        "holding the last accepted version is not being in sync"
    );
    // The same snapshot published again (e.g. by another trigger) changes nothing.
    s.handle_snapshot(second.clone());
    assert!(s.poll_response().is_none());
    // A new version is pushed.
    let third = snap(&input(&[10002], &[9002]));
    s.handle_snapshot(third.clone());
    let (_, r3) = poll_sotw(&mut s).unwrap();
    assert_eq!(r3.version_info, third.get(LDS).version);
}

#[test]
fn sotw_new_stream_of_a_node_that_nacked_is_served_its_last_accepted_version() {
    let good = snap(&input(&[10000], &[9002]));
    let bad = snap(&input(&[10001], &[9002]));
    let mut s = SotwStream::new(Some(good.clone()), NodeMemory::default());
    s.handle_request(&req(LDS, "", "", &[]));
    let (_, r1) = poll_sotw(&mut s).unwrap();
    s.handle_request(&req(LDS, &r1.version_info, &r1.nonce, &[]));
    s.handle_snapshot(bad.clone());
    let (_, r2) = poll_sotw(&mut s).unwrap();
    s.handle_request(&nack(req(LDS, &r1.version_info, &r2.nonce, &[]), "bad"));
    let memory: NodeMemory = ResourceType::ALL.map(|t| s.memory(t).clone());

    // The client restarts (empty version) and connects again: it gets the good version.
    let mut again = SotwStream::new(Some(bad.clone()), memory.clone());
    again.handle_request(&req(LDS, "", "", &[]));
    let (_, r) = poll_sotw(&mut again).unwrap();
    assert_eq!(r.version_info, good.get(LDS).version);
    // A client reconnecting with the version it holds gets nothing.
    let mut reconnect = SotwStream::new(Some(bad), memory);
    reconnect.handle_request(&req(LDS, &r1.version_info, "", &[]));
    assert!(reconnect.poll_response().is_none());
}

#[test]
fn sotw_reconnect_with_current_version_is_not_pushed() {
    let s1 = snap(&input(&[10000], &[9002]));
    let mut s = SotwStream::new(Some(s1.clone()), NodeMemory::default());
    s.handle_request(&req(CDS, &s1.get(CDS).version, "", &[]));
    s.handle_request(&req(LDS, &s1.get(LDS).version, "", &[]));
    s.handle_request(&req(
        RDS,
        &s1.get(RDS).version,
        "",
        &["infermesh/pool/pool-0"],
    ));
    s.handle_request(&req(EDS, &s1.get(EDS).version, "", &["infermesh-ext-proc"]));
    assert!(s.poll_response().is_none());
    for ty in ResourceType::ALL {
        assert_eq!(
            s.synced_version(ty).as_deref(),
            Some(s1.get(ty).version.as_str())
        );
    }
}

#[test]
fn sotw_make_before_break_order() {
    let s1 = snap(&input(&[10000], &[9002]));
    let mut s = SotwStream::new(Some(s1.clone()), NodeMemory::default());
    // The client holds s1 everywhere.
    s.handle_request(&req(LDS, &s1.get(LDS).version, "", &[]));
    s.handle_request(&req(CDS, &s1.get(CDS).version, "", &[]));
    s.handle_request(&req(EDS, &s1.get(EDS).version, "", &["infermesh-ext-proc"]));
    // A second pool: new cluster and new listener at once.
    s.handle_snapshot(snap(&input(&[10000, 10001], &[9002])));
    let (ty, cds) = poll_sotw(&mut s).unwrap();
    assert_eq!(ty, CDS, "clusters first");
    assert!(
        s.poll_response().is_none(),
        "the listener waits for the clusters' ACK"
    );
    s.handle_request(&req(CDS, &cds.version_info, &cds.nonce, &[]));
    let (ty, _) = poll_sotw(&mut s).unwrap();
    assert_eq!(ty, LDS);
}

#[test]
fn sotw_named_subscriptions_follow_the_request() {
    let s1 = snap(&input(&[10000, 10001], &[9002]));
    let mut s = SotwStream::new(Some(s1), NodeMemory::default());
    s.handle_request(&req(RDS, "", "", &["infermesh/pool/pool-0"]));
    let (_, r) = poll_sotw(&mut s).unwrap();
    assert_eq!(r.resources.len(), 1);
    s.handle_request(&req(
        RDS,
        &r.version_info,
        &r.nonce,
        &["infermesh/pool/pool-0"],
    ));
    assert!(s.poll_response().is_none());
    // A new name with the same version: resent with both.
    s.handle_request(&req(
        RDS,
        &r.version_info,
        &r.nonce,
        &["infermesh/pool/pool-0", "infermesh/pool/pool-1"],
    ));
    let (_, r) = poll_sotw(&mut s).unwrap();
    assert_eq!(r.resources.len(), 2);
    // The proxyless listener is served when asked for by name.
    s.handle_request(&req(LDS, "", "", &["epp"]));
    s.handle_request(&req(
        RDS,
        &r.version_info,
        &r.nonce,
        &["infermesh/pool/pool-0", "infermesh/pool/pool-1"],
    ));
    let (ty, l) = poll_sotw(&mut s).unwrap();
    assert_eq!(ty, LDS);
    assert_eq!(l.resources.len(), 1);
}

#[test]
fn sotw_unknown_types_are_reported_not_served() {
    let mut s = SotwStream::new(Some(snap(&input(&[10000], &[9002]))), NodeMemory::default());
    let mut r = req(LDS, "", "", &[]);
    r.type_url = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret".into();
    s.handle_request(&r);
    assert!(s.poll_response().is_none());
    assert!(matches!(
        events(&mut s).as_slice(),
        [StreamEvent::UnknownType { .. }]
    ));
}

fn dreq(ty: ResourceType, nonce: &str, sub: &[&str], unsub: &[&str]) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        node: Some(Node {
            id: "envoy-1".into(),
            ..Default::default()
        }),
        type_url: ty.type_url().into(),
        resource_names_subscribe: sub.iter().map(|n| n.to_string()).collect(),
        resource_names_unsubscribe: unsub.iter().map(|n| n.to_string()).collect(),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

fn poll_delta(s: &mut DeltaStream) -> Option<(ResourceType, DeltaDiscoveryResponse)> {
    s.poll_response().map(|(ty, r)| {
        (
            ty,
            DeltaDiscoveryResponse::decode(r.to_vec().as_slice()).unwrap(),
        )
    })
}

#[test]
fn delta_sends_only_changes_and_removes() {
    let mut s = DeltaStream::new(
        Some(snap(&input(&[10000, 10001], &[9002]))),
        NodeMemory::default(),
    );
    s.handle_request(&dreq(CDS, "", &[], &[]));
    let (_, r) = poll_delta(&mut s).unwrap();
    assert_eq!(r.resources.len(), 3, "ext-proc + two original-dst clusters");
    s.handle_request(&dreq(CDS, &r.nonce, &[], &[]));
    s.handle_request(&dreq(EDS, "", &["infermesh-ext-proc"], &[]));
    let (_, e) = poll_delta(&mut s).unwrap();
    assert_eq!(e.resources.len(), 1);
    s.handle_request(&dreq(EDS, &e.nonce, &[], &[]));
    s.handle_request(&dreq(LDS, "", &[], &[]));
    let (_, l) = poll_delta(&mut s).unwrap();
    assert_eq!(l.resources.len(), 2);
    s.handle_request(&dreq(LDS, &l.nonce, &[], &[]));
    assert!(s.poll_response().is_none());

    // A node joins: only the ext_proc load assignment is sent.
    s.handle_snapshot(snap(&input(&[10000, 10001], &[9002, 9003])));
    let (ty, e2) = poll_delta(&mut s).unwrap();
    assert_eq!(ty, EDS);
    assert_eq!(e2.resources.len(), 1);
    assert!(s.poll_response().is_none());
    s.handle_request(&dreq(EDS, &e2.nonce, &[], &[]));
    assert!(s.poll_response().is_none());

    // A pool goes: the listener stops naming its cluster first; only then is the cluster
    // removed (break after make).
    s.handle_snapshot(snap(&input(&[10000], &[9002, 9003])));
    let (ty, l) = poll_delta(&mut s).unwrap();
    assert_eq!(ty, LDS);
    assert_eq!(
        l.removed_resources,
        vec!["infermesh/pool/pool-1".to_string()]
    );
    assert!(
        s.poll_response().is_none(),
        "the cluster waits for the listener ACK"
    );
    s.handle_request(&dreq(LDS, &l.nonce, &[], &[]));
    let (ty, c) = poll_delta(&mut s).unwrap();
    assert_eq!(ty, CDS);
    assert_eq!(
        c.removed_resources,
        vec!["infermesh/pool/pool-1/original-dst".to_string()]
    );
    assert!(c.resources.is_empty());
}

#[test]
fn delta_reconnect_with_initial_versions_is_not_pushed() {
    let s1 = snap(&input(&[10000], &[9002]));
    let mut r = dreq(LDS, "", &[], &[]);
    r.initial_resource_versions = s1
        .get(LDS)
        .resources
        .values()
        .filter(|x| x.wildcard)
        .map(|x| (x.name.clone(), x.version.clone()))
        .collect::<HashMap<_, _>>();
    let mut s = DeltaStream::new(Some(s1.clone()), NodeMemory::default());
    s.handle_request(&r);
    assert!(s.poll_response().is_none());
    assert_eq!(s.synced_version(LDS), Some(s1.get(LDS).version.clone()));
    // Had it held a listener that is gone, it would be told to remove it.
    let mut r2 = r.clone();
    r2.initial_resource_versions
        .insert("infermesh/pool/old".into(), "1".into());
    let mut s = DeltaStream::new(Some(s1), NodeMemory::default());
    s.handle_request(&r2);
    let (_, resp) = poll_delta(&mut s).unwrap();
    assert!(resp.resources.is_empty());
    assert_eq!(
        resp.removed_resources,
        vec!["infermesh/pool/old".to_string()]
    );
}

#[test]
fn delta_nack_is_not_repushed_and_a_new_version_is() {
    let mut s = DeltaStream::new(Some(snap(&input(&[10000], &[9002]))), NodeMemory::default());
    s.handle_request(&dreq(LDS, "", &[], &[]));
    let (_, l1) = poll_delta(&mut s).unwrap();
    s.handle_request(&dreq(LDS, &l1.nonce, &[], &[]));
    let mut bad = input(&[10000], &[9002]);
    bad.pools[0].failure_mode = FailureMode::FailOpen;
    s.handle_snapshot(snap(&bad));
    let (_, l2) = poll_delta(&mut s).unwrap();
    let mut n = dreq(LDS, &l2.nonce, &[], &[]);
    n.error_detail = Some(Status {
        code: 3,
        message: "rejected".into(),
        details: vec![],
    });
    s.handle_request(&n);
    assert!(
        s.poll_response().is_none(),
        "NACKed resource version is not re-pushed"
    );
    let ev: Vec<_> = std::iter::from_fn(|| s.poll_event()).collect();
    assert!(
        ev.iter().any(
            |e| matches!(e, StreamEvent::Nacked { detail, .. } if detail.message == "rejected")
        )
    );
    s.handle_snapshot(snap(&input(&[10005], &[9002])));
    let (_, l3) = poll_delta(&mut s).unwrap();
    assert_eq!(l3.resources.len(), 1);
    assert_ne!(l3.resources[0].version, l2.resources[0].version);
}

#[test]
fn delta_named_subscriptions_absent_names_and_unsubscribe() {
    let mut s = DeltaStream::new(Some(snap(&input(&[10000], &[9002]))), NodeMemory::default());
    s.handle_request(&dreq(RDS, "", &["infermesh/pool/pool-0", "nope"], &[]));
    let (_, r) = poll_delta(&mut s).unwrap();
    assert_eq!(r.resources.len(), 1);
    assert_eq!(
        r.removed_resources,
        vec!["nope".to_string()],
        "absent names are reported once"
    );
    s.handle_request(&dreq(RDS, &r.nonce, &[], &[]));
    assert!(s.poll_response().is_none());
    s.handle_request(&dreq(RDS, "", &[], &["infermesh/pool/pool-0"]));
    // Unsubscribed: a change to it is not sent.
    s.handle_snapshot(snap(&input(&[10000, 10001], &[9002])));
    assert!(s.poll_response().is_none());
    // Wildcard via "*" on a non-wildcard type.
    s.handle_request(&dreq(RDS, "", &["*"], &[]));
    let (_, r) = poll_delta(&mut s).unwrap();
    assert_eq!(
        r.resources.len(),
        3,
        "two pool routes and the gRPC service route"
    );
}
