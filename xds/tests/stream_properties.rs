//! Property tests of the stream state machines against simulated clients: under any
//! interleaving of publishes, subscription changes and (delayed) deliveries, a client that
//! ACKs everything ends up holding exactly what it subscribed to from the published
//! snapshot; a client that NACKs is never sent the rejected version again before it
//! accepts another, and the exchange always comes to rest.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use infermesh_proto::envoy::config::core::v3::Node;
use infermesh_proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use infermesh_proto::google::rpc::Status;
use infermesh_xds::translate::translate;
use infermesh_xds::{
    DeltaStream, FailureMode, InferencePoolSpec, NodeMemory, ResourceType, Snapshot, SotwStream,
    XdsConfig, XdsInput,
};
use proptest::prelude::*;
use prost::Message;

const NAMED: [ResourceType; 2] = [ResourceType::Endpoint, ResourceType::Route];

fn variants() -> Vec<Arc<Snapshot>> {
    let mk = |pools: &[(&str, u16, bool)], nodes: &[u16]| {
        let input = XdsInput {
            pools: pools
                .iter()
                .map(|(n, port, open)| {
                    let mut p =
                        InferencePoolSpec::new(*n, ([127, 0, 0, 1], *port).into(), vec![8000]);
                    p.endpoints = vec![[10, 0, 0, 1].into()];
                    if *open {
                        p.failure_mode = FailureMode::FailOpen;
                    }
                    p
                })
                .collect(),
            ext_proc_endpoints: nodes.iter().map(|p| ([127, 0, 0, 1], *p).into()).collect(),
            grpc_services: vec!["epp".into()],
        };
        Arc::new(Snapshot::build(&translate(&input, &XdsConfig::default())).unwrap())
    };
    vec![
        mk(&[("a", 10000, false)], &[9002]),
        mk(&[("a", 10001, true)], &[9002, 9003]),
        mk(&[("a", 10000, false), ("b", 10002, false)], &[9003]),
        mk(&[("b", 10002, true)], &[9002]),
    ]
}

/// Names a client may subscribe to by name (some exist only in some variants).
fn universe(ty: ResourceType) -> Vec<String> {
    match ty {
        ResourceType::Endpoint => vec![
            "infermesh-ext-proc".into(),
            "infermesh/pool/a/endpoints".into(),
            "infermesh/pool/b/endpoints".into(),
        ],
        _ => vec![
            "infermesh/pool/a".into(),
            "infermesh/pool/b".into(),
            "epp".into(),
            "missing".into(),
        ],
    }
}

#[derive(Debug, Clone)]
enum Op {
    Publish(usize),
    Subscribe(usize, usize),
    Unsubscribe(usize, usize),
    /// The server hands out its next response (into the network queue).
    ServerPoll,
    /// The client receives the oldest queued response and ACKs (or NACKs) it.
    ClientRecv {
        nack: bool,
    },
}

fn ops(nacks: bool) -> impl Strategy<Value = Vec<Op>> {
    let op = prop_oneof![
        (0..4usize).prop_map(Op::Publish),
        (0..2usize, 0..4usize).prop_map(|(t, n)| Op::Subscribe(t, n)),
        (0..2usize, 0..4usize).prop_map(|(t, n)| Op::Unsubscribe(t, n)),
        Just(Op::ServerPoll),
        Just(Op::ServerPoll),
        prop::bool::weighted(if nacks { 0.3 } else { 0.0 })
            .prop_map(|nack| Op::ClientRecv { nack }),
        prop::bool::weighted(if nacks { 0.3 } else { 0.0 })
            .prop_map(|nack| Op::ClientRecv { nack }),
    ];
    prop::collection::vec(op, 1..60)
}

fn node() -> Option<Node> {
    Some(Node {
        id: "prop".into(),
        ..Default::default()
    })
}

fn nack_status() -> Option<Status> {
    Some(Status {
        code: 3,
        message: "rejected".into(),
        details: vec![],
    })
}

/// What a fully synced client must hold for `ty`.
fn expected(
    snap: &Snapshot,
    ty: ResourceType,
    names: &BTreeSet<String>,
) -> BTreeMap<String, String> {
    let wildcard = ty.legacy_wildcard();
    snap.get(ty)
        .view(wildcard, names)
        .map(|r| (r.name.clone(), r.version.clone()))
        .collect()
}

/// Tracks "never resend a rejected version before another is accepted".
#[derive(Default)]
struct Rejections(BTreeMap<(ResourceType, String), String>);

impl Rejections {
    fn check_sent(&self, ty: ResourceType, name: &str, version: &str) -> Result<(), TestCaseError> {
        prop_assert_ne!(
            self.0.get(&(ty, name.to_string())).map(String::as_str),
            Some(version),
            "{} {} re-sent at its rejected version",
            ty,
            name
        );
        Ok(())
    }
}

fn run_delta(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let snaps = variants();
    let mut current = Arc::clone(&snaps[0]);
    let mut s = DeltaStream::new(Some(current.clone()), NodeMemory::default());
    let mut names: [BTreeSet<String>; 4] = Default::default();
    let mut held: [BTreeMap<String, String>; 4] = Default::default();
    let mut queue: VecDeque<(ResourceType, DeltaDiscoveryResponse)> = VecDeque::new();
    let mut rejected = Rejections::default();
    let mut any_nack = false;
    for ty in ResourceType::ALL {
        let sub: Vec<String> = if ty.legacy_wildcard() {
            vec![]
        } else {
            vec![universe(ty)[0].clone()]
        };
        names[ty.index()].extend(sub.iter().cloned());
        s.handle_request(&DeltaDiscoveryRequest {
            node: node(),
            type_url: ty.type_url().into(),
            resource_names_subscribe: sub,
            ..Default::default()
        });
    }
    let recv = |s: &mut DeltaStream,
                queue: &mut VecDeque<(ResourceType, DeltaDiscoveryResponse)>,
                names: &[BTreeSet<String>; 4],
                held: &mut [BTreeMap<String, String>; 4],
                rejected: &mut Rejections,
                nack: bool|
     -> Result<(), TestCaseError> {
        let Some((ty, resp)) = queue.pop_front() else {
            return Ok(());
        };
        if nack {
            for r in &resp.resources {
                rejected.0.insert((ty, r.name.clone()), r.version.clone());
            }
        } else {
            for r in &resp.resources {
                rejected.0.remove(&(ty, r.name.clone()));
                // Like Envoy, a client keeps only what it is subscribed to (a response
                // sent before an unsubscribe may still carry the name).
                if ty.legacy_wildcard() || names[ty.index()].contains(&r.name) {
                    held[ty.index()].insert(r.name.clone(), r.version.clone());
                }
            }
            for n in &resp.removed_resources {
                held[ty.index()].remove(n);
                // Accepting a removal is accepting another state of the name.
                rejected.0.remove(&(ty, n.clone()));
            }
        }
        s.handle_request(&DeltaDiscoveryRequest {
            type_url: ty.type_url().into(),
            response_nonce: resp.nonce,
            error_detail: if nack { nack_status() } else { None },
            ..Default::default()
        });
        Ok(())
    };
    let poll = |s: &mut DeltaStream,
                queue: &mut VecDeque<(ResourceType, DeltaDiscoveryResponse)>,
                rejected: &Rejections|
     -> Result<bool, TestCaseError> {
        let Some((ty, r)) = s.poll_response() else {
            return Ok(false);
        };
        let resp = DeltaDiscoveryResponse::decode(r.to_vec().as_slice()).unwrap();
        for res in &resp.resources {
            rejected.check_sent(ty, &res.name, &res.version)?;
        }
        queue.push_back((ty, resp));
        Ok(true)
    };
    for op in ops {
        match op {
            Op::Publish(k) => {
                current = Arc::clone(&snaps[k]);
                s.handle_snapshot(current.clone());
            }
            Op::Subscribe(t, n) | Op::Unsubscribe(t, n) => {
                let ty = NAMED[t];
                let name = universe(ty)[n % universe(ty).len()].clone();
                let sub = matches!(op, Op::Subscribe(..));
                if sub {
                    names[ty.index()].insert(name.clone());
                } else {
                    names[ty.index()].remove(&name);
                    held[ty.index()].remove(&name);
                }
                s.handle_request(&DeltaDiscoveryRequest {
                    type_url: ty.type_url().into(),
                    resource_names_subscribe: if sub { vec![name.clone()] } else { vec![] },
                    resource_names_unsubscribe: if sub { vec![] } else { vec![name] },
                    ..Default::default()
                });
            }
            Op::ServerPoll => {
                poll(&mut s, &mut queue, &rejected)?;
            }
            Op::ClientRecv { nack } => {
                any_nack |= nack && !queue.is_empty();
                recv(&mut s, &mut queue, &names, &mut held, &mut rejected, nack)?;
            }
        }
    }
    // Drain: the client now accepts everything; the exchange must come to rest.
    for _ in 0..64 {
        while !queue.is_empty() {
            recv(&mut s, &mut queue, &names, &mut held, &mut rejected, false)?;
        }
        if !poll(&mut s, &mut queue, &rejected)? {
            break;
        }
    }
    prop_assert!(
        queue.is_empty() && s.poll_response().is_none(),
        "the exchange did not come to rest"
    );
    if !any_nack {
        for ty in ResourceType::ALL {
            let want = expected(&current, ty, &names[ty.index()]);
            // Names reported absent are not held.
            prop_assert_eq!(&held[ty.index()], &want, "{} differs", ty);
            prop_assert_eq!(s.synced_version(ty), Some(current.get(ty).version.clone()));
        }
    }
    Ok(())
}

fn run_sotw(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let snaps = variants();
    let mut current = Arc::clone(&snaps[0]);
    let mut s = SotwStream::new(Some(current.clone()), NodeMemory::default());
    let mut names: [BTreeSet<String>; 4] = Default::default();
    let mut held: [BTreeMap<String, String>; 4] = Default::default();
    let mut held_version: [String; 4] = Default::default();
    let mut last_nonce: [String; 4] = Default::default();
    let mut queue: VecDeque<(ResourceType, DiscoveryResponse, BTreeSet<String>)> = VecDeque::new();
    let mut rejected_version: [Option<(String, BTreeSet<String>)>; 4] = Default::default();
    let mut any_nack = false;
    let request =
        |ty: ResourceType, version: &str, nonce: &str, names: &BTreeSet<String>| DiscoveryRequest {
            node: node(),
            type_url: ty.type_url().into(),
            version_info: version.into(),
            response_nonce: nonce.into(),
            resource_names: names.iter().cloned().collect(),
            ..Default::default()
        };
    for ty in ResourceType::ALL {
        if !ty.legacy_wildcard() {
            names[ty.index()].insert(universe(ty)[0].clone());
        }
        s.handle_request(&request(ty, "", "", &names[ty.index()]));
    }
    for op in ops
        .into_iter()
        .map(Some)
        .chain(std::iter::repeat_n(None, 64))
    {
        let draining = op.is_none();
        let op = op.unwrap_or(if queue.is_empty() {
            Op::ServerPoll
        } else {
            Op::ClientRecv { nack: false }
        });
        match op {
            Op::Publish(k) => {
                current = Arc::clone(&snaps[k]);
                s.handle_snapshot(current.clone());
            }
            Op::Subscribe(t, n) | Op::Unsubscribe(t, n) => {
                let ty = NAMED[t];
                let name = universe(ty)[n % universe(ty).len()].clone();
                if matches!(op, Op::Subscribe(..)) {
                    names[ty.index()].insert(name);
                } else {
                    names[ty.index()].remove(&name);
                    held[ty.index()].remove(&name);
                }
                // A changed subscription may be answered with the rejected version again:
                // that is the client asking, not the server looping.
                rejected_version[ty.index()] = None;
                s.handle_request(&request(
                    ty,
                    &held_version[ty.index()],
                    &last_nonce[ty.index()],
                    &names[ty.index()],
                ));
            }
            Op::ServerPoll => {
                if let Some((ty, r)) = s.poll_response() {
                    let resp = DiscoveryResponse::decode(r.to_vec().as_slice()).unwrap();
                    // SotW versions are per type: the same version may be sent again only
                    // for a different subscription than the one rejected.
                    prop_assert_ne!(
                        rejected_version[ty.index()].as_ref(),
                        Some(&(resp.version_info.clone(), names[ty.index()].clone())),
                        "{} re-sent at its rejected version for the same subscription",
                        ty
                    );
                    queue.push_back((ty, resp, names[ty.index()].clone()));
                } else if draining {
                    break;
                }
            }
            Op::ClientRecv { nack } => {
                let Some((ty, resp, built_for)) = queue.pop_front() else {
                    continue;
                };
                last_nonce[ty.index()].clone_from(&resp.nonce);
                if nack {
                    any_nack = true;
                    rejected_version[ty.index()] = Some((resp.version_info.clone(), built_for));
                } else {
                    // Like Envoy, a client keeps only the names it still watches.
                    held[ty.index()] = resp
                        .resources
                        .iter()
                        .map(|a| current_name(ty, &a.value))
                        .filter(|n| ty.legacy_wildcard() || names[ty.index()].contains(n))
                        .map(|n| (n, String::new()))
                        .collect();
                    held_version[ty.index()].clone_from(&resp.version_info);
                    rejected_version[ty.index()] = None;
                }
                let mut req = request(
                    ty,
                    &held_version[ty.index()],
                    &resp.nonce,
                    &names[ty.index()],
                );
                if nack {
                    req.error_detail = nack_status();
                }
                s.handle_request(&req);
            }
        }
    }
    prop_assert!(
        queue.is_empty() && s.poll_response().is_none(),
        "the exchange did not come to rest"
    );
    if !any_nack {
        for ty in ResourceType::ALL {
            let want: BTreeSet<String> = expected(&current, ty, &names[ty.index()])
                .into_keys()
                .collect();
            let got: BTreeSet<String> = held[ty.index()].keys().cloned().collect();
            prop_assert_eq!(&got, &want, "{} differs", ty);
            if ty.legacy_wildcard() || !names[ty.index()].is_empty() {
                prop_assert_eq!(&held_version[ty.index()], &current.get(ty).version);
                prop_assert_eq!(s.synced_version(ty), Some(current.get(ty).version.clone()));
            }
        }
    }
    Ok(())
}

/// The name inside an encoded resource of `ty`.
fn current_name(ty: ResourceType, bytes: &[u8]) -> String {
    use infermesh_proto::envoy::config::{cluster, endpoint, listener, route};
    match ty {
        ResourceType::Cluster => cluster::v3::Cluster::decode(bytes).unwrap().name,
        ResourceType::Endpoint => {
            endpoint::v3::ClusterLoadAssignment::decode(bytes)
                .unwrap()
                .cluster_name
        }
        ResourceType::Listener => listener::v3::Listener::decode(bytes).unwrap().name,
        ResourceType::Route => route::v3::RouteConfiguration::decode(bytes).unwrap().name,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn delta_client_converges(ops in ops(false)) {
        run_delta(ops)?;
    }

    #[test]
    fn delta_nacks_never_loop(ops in ops(true)) {
        run_delta(ops)?;
    }

    #[test]
    fn sotw_client_converges(ops in ops(false)) {
        run_sotw(ops)?;
    }

    #[test]
    fn sotw_nacks_never_loop(ops in ops(true)) {
        run_sotw(ops)?;
    }
}
