//! Publisher and subscriber over real ZMQ sockets on 127.0.0.1 with ephemeral ports; a
//! hand-driven PUB and ROUTER stand in for a misbehaving publisher.

use std::time::Duration;

use bytes::Bytes;
use infermesh_kvevents::frame::{parse_replay_request, replay_end, replay_reply};
use infermesh_kvevents::{
    Encoding, EventBatch, KvEvent, Message, Publisher, PublisherConfig, Subscriber,
    SubscriberConfig, Update, encode,
};
use tokio::sync::mpsc;
use zeromq::{PubSocket, RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

const TOPIC: &str = "kv@127.0.0.1:8000@m";
const WAIT: Duration = Duration::from_secs(20);

fn batch(i: u64) -> EventBatch {
    EventBatch {
        ts: i as f64,
        events: vec![KvEvent::BlockRemoved {
            block_hashes: vec![i],
            medium: Some("GPU".into()),
            group_idx: None,
        }],
        data_parallel_rank: None,
    }
}

async fn publisher(replay: bool, encoding: Encoding) -> Publisher {
    let mut cfg = PublisherConfig::new("tcp://127.0.0.1:0", TOPIC);
    cfg.force_bind = true;
    cfg.encoding = encoding;
    if replay {
        cfg.replay_endpoint = Some("tcp://127.0.0.1:0".into());
    }
    Publisher::start(cfg).await.unwrap()
}

fn sub_config(port: u16, replay_port: Option<u16>) -> SubscriberConfig {
    let mut cfg = SubscriberConfig::new(format!("tcp://127.0.0.1:{port}"));
    cfg.replay_endpoint = replay_port.map(|p| format!("tcp://127.0.0.1:{p}"));
    cfg.reconnect_interval = Duration::from_millis(100);
    cfg
}

async fn next(rx: &mut mpsc::Receiver<Update>) -> Update {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("an update in time")
        .expect("subscriber running")
}

fn seq_of(u: &Update) -> u64 {
    match u {
        Update::Batch { seq, batch, .. } => {
            assert_eq!(batch.ts, *seq as f64, "payload matches its seq");
            *seq
        }
        other => panic!("expected a batch, got {other:?}"),
    }
}

/// Publishes one batch at a time until the subscriber has seen something: the SUB's
/// subscription reaches the PUB asynchronously (ZMQ's slow joiner), so there is no fixed
/// moment after which nothing is missed. Returns the first update and the next batch index.
async fn publish_until_heard(
    p: &Publisher,
    rx: &mut mpsc::Receiver<Update>,
    mut i: u64,
) -> (Update, u64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        p.publish(batch(i)).unwrap();
        i += 1;
        if let Ok(Some(u)) = tokio::time::timeout(Duration::from_millis(50), rx.recv()).await {
            return (u, i);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "subscriber heard nothing"
        );
    }
}

#[tokio::test]
async fn in_order_delivery_with_resume_from_zero() {
    for encoding in [Encoding::Array, Encoding::Map] {
        let p = publisher(true, encoding).await;
        let mut cfg = sub_config(p.port().unwrap(), p.replay_port());
        cfg.start_seq = Some(0);
        let (s, mut rx) = Subscriber::spawn(cfg);
        let (first, mut n) = publish_until_heard(&p, &mut rx, 0).await;
        // Whatever the slow joiner missed was replayed: the stream starts at 0.
        assert_eq!(seq_of(&first), 0);
        for i in n..n + 30 {
            p.publish(batch(i)).unwrap();
        }
        n += 30;
        for want in 1..n {
            assert_eq!(seq_of(&next(&mut rx).await), want);
        }
        let st = s.stats();
        assert_eq!(st.batches.load(std::sync::atomic::Ordering::Relaxed), n);
        assert_eq!(
            st.decode_errors.load(std::sync::atomic::Ordering::Relaxed),
            0
        );
        p.shutdown().await;
    }
}

#[tokio::test]
async fn a_late_joiner_recovers_history_through_replay() {
    let p = publisher(true, Encoding::Array).await;
    for i in 0..50 {
        p.publish(batch(i)).unwrap();
    }
    let mut cfg = sub_config(p.port().unwrap(), p.replay_port());
    cfg.start_seq = Some(10); // a new owner that had applied 0..10
    let (s, mut rx) = Subscriber::spawn(cfg);
    let (first, n) = publish_until_heard(&p, &mut rx, 50).await;
    assert_eq!(seq_of(&first), 10);
    for want in 11..n {
        let u = next(&mut rx).await;
        assert_eq!(seq_of(&u), want);
    }
    let st = s.stats();
    assert!(st.replays.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    assert!(st.replayed.load(std::sync::atomic::Ordering::Relaxed) >= 40);
    assert_eq!(
        p.stats()
            .replays_served
            .load(std::sync::atomic::Ordering::Relaxed),
        st.replays.load(std::sync::atomic::Ordering::Relaxed)
    );
}

#[tokio::test]
async fn without_replay_a_resume_gap_is_reported_lost() {
    let p = publisher(false, Encoding::Array).await;
    let mut cfg = sub_config(p.port().unwrap(), None);
    cfg.start_seq = Some(0);
    for i in 0..5 {
        p.publish(batch(i)).unwrap();
    }
    let (_s, mut rx) = Subscriber::spawn(cfg);
    let (first, _) = publish_until_heard(&p, &mut rx, 5).await;
    let Update::Lost { from: 0, to, .. } = first else {
        panic!("expected a loss from 0, got {first:?}");
    };
    assert_eq!(seq_of(&next(&mut rx).await), to);
}

/// A hand-driven publisher: a raw PUB whose frames the test chooses, and a ROUTER that
/// answers replay requests from a fixed buffer.
struct FakePublisher {
    pub_socket: PubSocket,
    port: u16,
    replay_port: u16,
    requests: mpsc::UnboundedReceiver<u64>,
}

fn port_of(ep: &zeromq::Endpoint) -> u16 {
    match ep {
        zeromq::Endpoint::Tcp(_, p) => *p,
        other => panic!("not tcp: {other}"),
    }
}

impl FakePublisher {
    /// `buffer` holds the seqs its replay socket still has.
    async fn start(buffer: Vec<u64>) -> FakePublisher {
        let mut pub_socket = PubSocket::new();
        let port = port_of(&pub_socket.bind("tcp://127.0.0.1:0").await.unwrap());
        let mut router = RouterSocket::new();
        let replay_port = port_of(&router.bind("tcp://127.0.0.1:0").await.unwrap());
        let (tx, requests) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(m) = router.recv().await {
                let (id, start) = parse_replay_request(&m.into_vec()).unwrap();
                let _ = tx.send(start);
                for &s in buffer.iter().filter(|&&s| s >= start) {
                    let payload = Bytes::from(encode(&batch(s), Encoding::Map));
                    let m = ZmqMessage::try_from(replay_reply(&id, s, &payload)).unwrap();
                    router.send(m).await.unwrap();
                }
                router
                    .send(ZmqMessage::try_from(replay_end(&id)).unwrap())
                    .await
                    .unwrap();
            }
        });
        FakePublisher {
            pub_socket,
            port,
            replay_port,
            requests,
        }
    }

    async fn send_frames(&mut self, frames: Vec<Bytes>) {
        self.pub_socket
            .send(ZmqMessage::try_from(frames).unwrap())
            .await
            .unwrap();
    }

    async fn send_seq(&mut self, seq: u64) {
        let m = Message {
            topic: Bytes::from_static(TOPIC.as_bytes()),
            seq,
            payload: Bytes::from(encode(&batch(seq), Encoding::Array)),
        };
        self.send_frames(m.to_frames()).await;
    }
}

#[tokio::test]
async fn gaps_are_replayed_bad_frames_counted_and_the_end_marker_ends_the_replay() {
    // The replay buffer lost 3; it still has 4..=6.
    let mut f = FakePublisher::start(vec![4, 5, 6]).await;
    let (s, mut rx) = Subscriber::spawn(sub_config(f.port, Some(f.replay_port)));
    // Seq 0 until heard (the same seq again reads as a publisher restart, harmless here).
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        f.send_seq(0).await;
        if let Ok(Some(u)) = tokio::time::timeout(Duration::from_millis(50), rx.recv()).await {
            assert_eq!(seq_of(&u), 0);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline);
    }
    while let Ok(Some(u)) = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
        assert!(matches!(
            u,
            Update::Restarted { .. } | Update::Batch { seq: 0, .. }
        ));
    }
    f.send_seq(1).await;
    assert_eq!(seq_of(&next(&mut rx).await), 1);
    // Malformed multiparts: two frames, a 7-byte seq, a payload that is not msgpack.
    f.send_frames(vec![Bytes::from_static(b"kv@a@b"), Bytes::new()])
        .await;
    f.send_frames(vec![
        Bytes::from_static(b"kv@a@b"),
        Bytes::from_static(&[0; 7]),
        Bytes::new(),
    ])
    .await;
    f.send_frames(vec![
        Bytes::from_static(TOPIC.as_bytes()),
        Bytes::copy_from_slice(&2u64.to_be_bytes()),
        Bytes::from_static(b"\xc1"),
    ])
    .await;
    // 3 and 4 are never sent live; 5 arrives: a gap 3..5.
    f.send_seq(5).await;
    let lost = next(&mut rx).await;
    assert_eq!(
        lost,
        Update::Lost {
            topic: TOPIC.into(),
            from: 3,
            to: 4
        }
    );
    assert_eq!(f.requests.recv().await, Some(3));
    // 4 and 5 come from the replay; 6 too (the buffer had it): the end marker stopped the
    // replay and live 5 was dropped as a duplicate.
    for want in [4, 5, 6] {
        let u = next(&mut rx).await;
        assert!(matches!(u, Update::Batch { replayed: true, .. }), "{u:?}");
        assert_eq!(seq_of(&u), want);
    }
    f.send_seq(6).await; // already replayed
    f.send_seq(7).await;
    let u = next(&mut rx).await;
    assert!(matches!(
        u,
        Update::Batch {
            replayed: false,
            ..
        }
    ));
    assert_eq!(seq_of(&u), 7);
    let st = s.stats();
    let get = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(get(&st.bad_frames), 2);
    assert_eq!(get(&st.decode_errors), 1);
    assert_eq!(get(&st.gaps), 1);
    assert_eq!(get(&st.replays), 1);
    assert_eq!(get(&st.lost), 1);
    assert_eq!(get(&st.duplicates), 2);
}

#[tokio::test]
async fn the_subscriber_retries_until_the_publisher_appears() {
    // Take a free port, release it, subscribe to it before anything listens.
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = probe.local_addr().unwrap().port();
    drop(probe);
    let (s, mut rx) = Subscriber::spawn(sub_config(port, None));
    let deadline = tokio::time::Instant::now() + WAIT;
    while s
        .stats()
        .reconnects
        .load(std::sync::atomic::Ordering::Relaxed)
        == 0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no failed attempt seen"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut cfg = PublisherConfig::new(format!("tcp://127.0.0.1:{port}"), TOPIC);
    cfg.force_bind = true;
    let p = Publisher::start(cfg).await.unwrap();
    let (u, _) = publish_until_heard(&p, &mut rx, 0).await;
    assert!(matches!(u, Update::Batch { .. }));
}

#[tokio::test]
async fn a_restarted_publisher_is_reported_and_its_new_run_replayed_from_zero() {
    let p = publisher(true, Encoding::Array).await;
    let (port, replay_port) = (p.port().unwrap(), p.replay_port().unwrap());
    let (s, mut rx) = Subscriber::spawn(sub_config(port, Some(replay_port)));
    let (first, n) = publish_until_heard(&p, &mut rx, 0).await;
    let mut last = seq_of(&first);
    for i in n..n + 10 {
        p.publish(batch(i)).unwrap();
    }
    while last + 1 < n + 10 {
        last = seq_of(&next(&mut rx).await);
    }
    p.shutdown().await;

    // Same ports, a new process: numbering starts at 0 again.
    let mut cfg = PublisherConfig::new(format!("tcp://127.0.0.1:{port}"), TOPIC);
    cfg.force_bind = true;
    cfg.replay_endpoint = Some(format!("tcp://127.0.0.1:{replay_port}"));
    let p = Publisher::start(cfg).await.unwrap();
    let (first, n) = publish_until_heard(&p, &mut rx, 0).await;
    assert_eq!(
        first,
        Update::Restarted {
            topic: TOPIC.into()
        }
    );
    // Whatever the reconnecting SUB missed of the new run came back through replay.
    for want in 0..n {
        assert_eq!(seq_of(&next(&mut rx).await), want);
    }
    let get = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(get(&s.stats().restarts), 1);
    assert_eq!(get(&s.stats().lost), 0);
    p.shutdown().await;
}
