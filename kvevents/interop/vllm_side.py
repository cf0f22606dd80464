#!/usr/bin/env python3
"""The vLLM side of an interop check, on libzmq (pyzmq) and msgspec as vLLM uses them.

consume: subscribe to a publisher (e.g. infermesh-sim with --enable-kv-cache-events),
         decode every payload with msgspec typed decoders declared like vLLM's
         vllm/distributed/kv_events.py structs (strict: a wrong type, a missing field or
         an unknown tag fails), check the 3 frames and contiguous sequence numbers, then
         ask the replay ROUTER for everything from seq 0 over a DEALER and check the
         replies and the -1 end marker.
publish: play vLLM's ZmqEventPublisher: bind PUB and ROUTER, publish N batches
         encoded by msgspec (tag, seq as 8 bytes big-endian), keep them for replay and
         answer replay requests as [identity, "", seq, payload] ... [identity, "", -1, ""].

Needs `pip install pyzmq msgspec`. Prints one JSON summary line; exits non-zero on a
mismatch.
"""

import argparse
import json
import sys
import time
from typing import Any, Optional, Union

import msgspec
import zmq


def structs(array_like: bool, batch_map: bool = False):
    """vLLM's event schema, in the positional (array_like) or the map (PR #42892) form;
    `batch_map` makes the batch a map too, as msgspec writes it without array_like."""

    class Event(msgspec.Struct, array_like=array_like, omit_defaults=True, tag=True):
        pass

    class BlockStored(Event):
        block_hashes: list[Union[int, bytes]]
        parent_block_hash: Optional[Union[int, bytes]]
        token_ids: list[int]
        block_size: int
        lora_id: Optional[int]
        medium: Optional[str]
        lora_name: Optional[str]
        extra_keys: Optional[list[Any]] = None
        group_idx: Optional[int] = None
        kv_cache_spec_kind: Optional[str] = None
        kv_cache_spec_sliding_window: Optional[int] = None

    class BlockRemoved(Event):
        block_hashes: list[Union[int, bytes]]
        medium: Optional[str]
        group_idx: Optional[int] = None

    class AllBlocksCleared(Event):
        pass

    # Positional unless asked otherwise (vLLM's kv_events.py after PR #42892 drops
    # array_like from the batch as well).
    class Batch(msgspec.Struct, array_like=not batch_map, omit_defaults=True):
        ts: float
        events: list[Union[BlockStored, BlockRemoved, AllBlocksCleared]]
        data_parallel_rank: Optional[int] = None

    return Batch, BlockStored, BlockRemoved, AllBlocksCleared


def consume(a):
    Batch, BlockStored, BlockRemoved, Cleared = structs(a.encoding == "array")
    dec = msgspec.msgpack.Decoder(Batch)
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.connect(a.endpoint)
    sub.setsockopt_string(zmq.SUBSCRIBE, "kv@")
    counts = {"batches": 0, "stored": 0, "removed": 0, "cleared": 0, "byte_hashes": 0}
    first = last = None
    topic = None
    deadline = time.time() + a.timeout
    while counts["batches"] < a.count:
        if not sub.poll(int(max(0, deadline - time.time()) * 1000)):
            sys.exit(f"timeout after {counts['batches']} batches")
        frames = sub.recv_multipart()
        assert len(frames) == 3, f"{len(frames)} frames"
        topic = frames[0].decode()
        assert len(frames[1]) == 8
        seq = int.from_bytes(frames[1], "big")
        if last is not None:
            assert seq == last + 1, f"seq {seq} after {last}"
        first = seq if first is None else first
        last = seq
        batch = dec.decode(frames[2])
        counts["batches"] += 1
        for e in batch.events:
            if isinstance(e, BlockStored):
                counts["stored"] += 1
                assert len(e.token_ids) == len(e.block_hashes) * e.block_size
                counts["byte_hashes"] += sum(isinstance(h, bytes) for h in e.block_hashes)
            elif isinstance(e, BlockRemoved):
                counts["removed"] += 1
            else:
                counts["cleared"] += 1
    replayed = 0
    if a.replay:
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(a.replay)
        dealer.send_multipart([b"", (0).to_bytes(8, "big")])
        expect = 0
        while True:
            if not dealer.poll(5000):
                sys.exit("replay: no reply")
            empty, seq_b, payload = dealer.recv_multipart()
            assert empty == b""
            if seq_b == (-1).to_bytes(8, "big", signed=True):
                assert payload == b""
                break
            seq = int.from_bytes(seq_b, "big")
            assert seq == expect, f"replayed {seq}, expected {expect}"
            dec.decode(payload)
            expect += 1
            replayed += 1
        assert replayed > last, f"replay ended at {replayed}, live reached {last}"
    print(json.dumps({"topic": topic, "first": first, "last": last, "replayed": replayed, **counts}))


def publish(a):
    Batch, BlockStored, BlockRemoved, Cleared = structs(a.encoding == "array", a.batch_map)
    enc = msgspec.msgpack.Encoder()
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    pub.bind(a.endpoint)
    router = ctx.socket(zmq.ROUTER)
    router.bind(a.replay)
    buffer = []
    topic = a.topic.encode()
    parent = None
    for seq in range(a.count):
        h = (seq + 1) * 0x0101010101010101 & 0xFFFFFFFFFFFFFFFF
        hash_v = h.to_bytes(32, "big") if a.byte_hashes else h
        events = [
            BlockStored(
                block_hashes=[hash_v],
                parent_block_hash=parent,
                token_ids=list(range(seq, seq + 4)),
                block_size=4,
                lora_id=None,
                medium="GPU",
                lora_name=None,
            )
        ]
        if seq % 3 == 2:
            events.append(BlockRemoved(block_hashes=[hash_v], medium="GPU"))
        if seq == a.count - 1:
            events.append(Cleared())
        parent = hash_v
        payload = enc.encode(Batch(ts=time.time(), events=events, data_parallel_rank=0))
        buffer.append((seq, payload))
        pub.send_multipart((topic, seq.to_bytes(8, "big"), payload))
        # Serve replay requests between batches, as vLLM's publisher thread does.
        while router.poll(0):
            serve_replay(router, buffer)
        time.sleep(a.interval)
    end = time.time() + a.linger
    while time.time() < end:
        if router.poll(100):
            serve_replay(router, buffer)
    print(json.dumps({"published": a.count}))


def serve_replay(router, buffer):
    frames = router.recv_multipart()
    if len(frames) != 3:
        return
    client, _, start_b = frames
    start = int.from_bytes(start_b, "big")
    for seq, buf in buffer:
        if seq >= start:
            router.send_multipart((client, b"", seq.to_bytes(8, "big"), buf))
    router.send_multipart((client, b"", (-1).to_bytes(8, "big", signed=True), b""))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["consume", "publish"])
    p.add_argument("--endpoint", required=True)
    p.add_argument("--replay")
    p.add_argument("--encoding", choices=["array", "map"], default="array")
    p.add_argument("--count", type=int, default=20)
    p.add_argument("--timeout", type=float, default=30)
    p.add_argument("--topic", default="kv@127.0.0.1:8000@m")
    p.add_argument("--byte-hashes", action="store_true")
    p.add_argument("--batch-map", action="store_true", help="publish: the batch as a map")
    p.add_argument("--interval", type=float, default=0.05)
    p.add_argument("--linger", type=float, default=10)
    a = p.parse_args()
    consume(a) if a.mode == "consume" else publish(a)


if __name__ == "__main__":
    main()
