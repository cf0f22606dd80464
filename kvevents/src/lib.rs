//! infermesh-kvevents: vLLM's KV-cache events, the way vLLM publishes them and llm-d reads
//! them.
//!
//! Contract: a pod's engine publishes one [`EventBatch`] per engine step on a ZMQ PUB
//! socket as three frames `[topic, seq, payload]` (`topic` = `kv@<pod-ip>:<port>@<model>`,
//! `seq` a u64 in 8 bytes big-endian counting from 0, `payload` msgpack), and keeps the
//! last `buffer_steps` payloads for replay over a ROUTER socket. A [`Subscriber`] applies
//! every batch exactly once and in order: it tracks `seq` per topic, fetches gaps from the
//! replay socket, drops duplicates, and reports what could not be recovered
//! ([`Update::Lost`]) or a publisher restart ([`Update::Restarted`]) instead of hiding it.
//!
//! Layers: [`wire`] (payload codec), [`topic`], [`frame`] (multipart layouts) and [`seq`]
//! ([`SequenceTracker`]) are sans-IO and tested without sockets; [`Publisher`] and
//! [`Subscriber`] are thin tokio tasks over them.
//!
//! ```
//! use infermesh_kvevents::{
//!     Encoding, EventBatch, KvEvent, Message, SequenceTracker, Topic, Verdict, decode, encode,
//! };
//!
//! let batch = EventBatch {
//!     ts: 1.5,
//!     events: vec![KvEvent::BlockRemoved {
//!         block_hashes: vec![42],
//!         medium: Some("GPU".into()),
//!         group_idx: None,
//!     }],
//!     data_parallel_rank: Some(0),
//! };
//! let topic = Topic::new("10.0.0.7:8000", "meta-llama/Llama-3.1-8B-Instruct").unwrap();
//! let frames = Message {
//!     topic: topic.to_string().into(),
//!     seq: 7,
//!     payload: encode(&batch, Encoding::Map).into(),
//! }
//! .to_frames();
//!
//! // The receiving side: frames, then order, then the payload.
//! let m = Message::from_frames(frames).unwrap();
//! let mut order = SequenceTracker::resume_from(5);
//! assert_eq!(order.on_live(m.seq), Verdict::Gap { from: 5, to: 7 }); // replay 5 and 6 first
//! assert_eq!(decode(&m.payload).unwrap().batch, batch);
//! assert_eq!(Topic::parse(std::str::from_utf8(&m.topic).unwrap()).unwrap(), topic);
//! ```
//!
//! # Unknown event types
//!
//! [`decode`] skips an event whose tag it does not know and lists it in
//! [`Decoded::skipped`]; the rest of the batch is returned and applies. vLLM adds event
//! types over time, and dropping a whole batch for one new event would lose the
//! `BlockStored`/`BlockRemoved` next to it, which corrupts an index more than ignoring an
//! event it could not use anyway. The subscriber counts skipped events
//! ([`SubscriberStats::unknown_events`]). A *known* event with a bad field, or a payload
//! that is not msgpack, rejects the whole batch ([`DecodeError`]): the producer is broken,
//! and applying half of its batch would be a guess.
//!
//! # Msgpack crate
//!
//! `rmpv` (with `rmp` underneath, both from the rmp-rs project, the most used msgpack
//! implementation in Rust). Decoding goes through a dynamic `rmpv::Value` because the
//! payload has to be read in two layouts (positional tagged arrays and `"type"` maps,
//! also mixed), with hashes that are integers or bytes and trailing fields that may be
//! absent: a serde derive (`rmp-serde`) would need hand-written visitors for all of that
//! anyway. `rmpv` caps preallocation and nesting depth, so hostile input costs neither
//! memory nor stack.
//!
//! # ZMQ crate
//!
//! `zeromq` (zmq.rs), the pure-Rust ZMTP 3 implementation on tokio, at 0.6 (0.7 needs a
//! newer Rust than the workspace's `rust-version`). It builds with cargo alone, so CI and
//! developer machines need no system package, and it has PUB/SUB with prefix
//! subscriptions and ROUTER/DEALER, which is all this protocol uses; its 0.6 release runs
//! conformance tests against libzmq for exactly those pairs. The alternative, the `zmq`
//! crate, binds libzmq through C and needs Debian's `libzmq3-dev` on every machine that
//! builds the workspace. Two limits of zmq.rs are handled here: it does not resolve
//! libzmq's `*` wildcard host (the publisher binds `0.0.0.0` for `tcp://*:…`), and only
//! the TCP transport is enabled (vLLM's `ipc://`/`inproc://` endpoints are not needed by
//! a router that reads pods over the network).

//!
//! # Interop
//!
//! `interop/vllm_side.py` plays vLLM's side on libzmq (pyzmq) and msgspec, with vLLM's
//! struct layout: `consume` decodes a publisher's stream with strict msgspec decoders and
//! replays from 0 over a DEALER; `publish` acts as vLLM's `ZmqEventPublisher` (PUB, ROUTER
//! replay, positional or map events, int or 32-byte hashes, batch as array or map) for
//! `examples/tail.rs`. Both directions passed against libzmq 4.3.5 and msgspec 0.23 with
//! `infermesh-sim --enable-kv-cache-events` as the publisher, a late-joining tail
//! recovering the start of the stream through replay.

pub mod frame;
pub mod publisher;
pub mod seq;
pub mod subscriber;
pub mod topic;
pub mod wire;

pub use frame::{FrameError, Message, REPLAY_END};
pub use publisher::{Publisher, PublisherClosed, PublisherConfig, PublisherError, PublisherStats};
pub use seq::{SequenceTracker, Verdict};
pub use subscriber::{Subscriber, SubscriberConfig, SubscriberStats, Update};
pub use topic::{TOPIC_PREFIX, Topic, TopicError};
pub use wire::{
    DecodeError, Decoded, Encoding, EventBatch, HashFormat, KvEvent, MEDIUM_GPU, SkippedEvent,
    decode, encode, encode_with,
};
