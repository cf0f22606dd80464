//! ZMQ frames of the KV-event protocol, sans-IO.
//!
//! Live: one multipart `[topic, seq, payload]` per batch, `seq` a u64 in 8 bytes big-endian.
//! Replay (vLLM's ROUTER): the client sends `[identity, "", start_seq]` as the ROUTER sees
//! it (a DEALER sends `["", start_seq]`); the server answers `[identity, "", seq, payload]`
//! for each buffered batch with `seq >= start_seq`, then `[identity, "", -1, ""]`, where
//! -1 is an i64 in 8 bytes big-endian (all `0xff`).

use bytes::Bytes;

/// The replay end marker: seq -1 as 8 bytes big-endian.
pub const REPLAY_END: [u8; 8] = (-1i64).to_be_bytes();

/// One live message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The topic frame.
    pub topic: Bytes,
    /// The publisher's sequence number.
    pub seq: u64,
    /// The msgpack batch.
    pub payload: Bytes,
}

/// Why frames were rejected; nothing was applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A live message must have exactly 3 frames.
    #[error("expected 3 frames, got {0}")]
    FrameCount(usize),
    /// A sequence number must be exactly 8 bytes.
    #[error("sequence frame is {0} bytes, not 8")]
    SeqLength(usize),
    /// A replay request or reply does not have the expected layout.
    #[error("malformed replay frames ({0} frames)")]
    Replay(usize),
}

impl Message {
    /// The three frames to send.
    pub fn to_frames(&self) -> Vec<Bytes> {
        vec![
            self.topic.clone(),
            Bytes::copy_from_slice(&self.seq.to_be_bytes()),
            self.payload.clone(),
        ]
    }

    /// Reads a received multipart; rejects anything but 3 frames with an 8-byte seq.
    pub fn from_frames(mut frames: Vec<Bytes>) -> Result<Message, FrameError> {
        if frames.len() != 3 {
            return Err(FrameError::FrameCount(frames.len()));
        }
        let payload = frames.pop().expect("3 frames");
        let seq = seq_of(&frames.pop().expect("3 frames"))?;
        let topic = frames.pop().expect("3 frames");
        Ok(Message {
            topic,
            seq,
            payload,
        })
    }
}

fn seq_of(b: &[u8]) -> Result<u64, FrameError> {
    let a: [u8; 8] = b.try_into().map_err(|_| FrameError::SeqLength(b.len()))?;
    Ok(u64::from_be_bytes(a))
}

/// Frames a DEALER sends to ask for every buffered batch from `start_seq` on.
pub fn replay_request(start_seq: u64) -> Vec<Bytes> {
    vec![
        Bytes::new(),
        Bytes::copy_from_slice(&start_seq.to_be_bytes()),
    ]
}

/// A replay request as the ROUTER receives it: `(identity, start_seq)`.
pub fn parse_replay_request(frames: &[Bytes]) -> Result<(Bytes, u64), FrameError> {
    match frames {
        [identity, _empty, start] => Ok((identity.clone(), seq_of(start)?)),
        _ => Err(FrameError::Replay(frames.len())),
    }
}

/// Frames a ROUTER sends to `identity` for one buffered batch.
pub fn replay_reply(identity: &Bytes, seq: u64, payload: &Bytes) -> Vec<Bytes> {
    vec![
        identity.clone(),
        Bytes::new(),
        Bytes::copy_from_slice(&seq.to_be_bytes()),
        payload.clone(),
    ]
}

/// Frames a ROUTER sends to `identity` to end a replay.
pub fn replay_end(identity: &Bytes) -> Vec<Bytes> {
    vec![
        identity.clone(),
        Bytes::new(),
        Bytes::from_static(&REPLAY_END),
        Bytes::new(),
    ]
}

/// One reply a replay client receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplayItem {
    /// A buffered batch.
    Batch {
        /// Its sequence number.
        seq: u64,
        /// Its msgpack payload.
        payload: Bytes,
    },
    /// The end marker: the replay is complete.
    End,
}

/// Reads a reply as a DEALER receives it (`["", seq, payload]`), or as a REQ-style client
/// does with the delimiter already stripped (`[seq, payload]`).
pub fn parse_replay_reply(frames: &[Bytes]) -> Result<ReplayItem, FrameError> {
    let (seq, payload) = match frames {
        [empty, seq, payload] if empty.is_empty() => (seq, payload),
        [seq, payload] => (seq, payload),
        _ => return Err(FrameError::Replay(frames.len())),
    };
    if seq.as_ref() == REPLAY_END {
        return Ok(ReplayItem::End);
    }
    Ok(ReplayItem::Batch {
        seq: seq_of(seq)?,
        payload: payload.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_frames_round_trip_and_bad_layouts_are_rejected() {
        let m = Message {
            topic: Bytes::from_static(b"kv@1.2.3.4:80@m"),
            seq: 0x0102_0304_0506_0708,
            payload: Bytes::from_static(b"\x92\xcb"),
        };
        let f = m.to_frames();
        assert_eq!(f[1].as_ref(), &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(Message::from_frames(f.clone()).unwrap(), m);
        assert_eq!(
            Message::from_frames(f[..2].to_vec()),
            Err(FrameError::FrameCount(2))
        );
        let mut four = f.clone();
        four.push(Bytes::new());
        assert_eq!(Message::from_frames(four), Err(FrameError::FrameCount(4)));
        let mut short = f;
        short[1] = Bytes::from_static(&[0; 7]);
        assert_eq!(Message::from_frames(short), Err(FrameError::SeqLength(7)));
    }

    #[test]
    fn replay_frames_match_vllm() {
        let id = Bytes::from_static(b"\x00peer");
        // What the ROUTER sees of a DEALER's request: identity prepended.
        let mut req = vec![id.clone()];
        req.extend(replay_request(42));
        assert_eq!(parse_replay_request(&req).unwrap(), (id.clone(), 42));
        assert!(parse_replay_request(&req[1..]).is_err());
        // What the DEALER sees of the ROUTER's replies: identity stripped.
        let reply = replay_reply(&id, 7, &Bytes::from_static(b"p"));
        assert_eq!(
            parse_replay_reply(&reply[1..]).unwrap(),
            ReplayItem::Batch {
                seq: 7,
                payload: Bytes::from_static(b"p")
            }
        );
        let end = replay_end(&id);
        assert_eq!(end[2].as_ref(), &[0xff; 8]);
        assert!(end[3].is_empty());
        assert_eq!(parse_replay_reply(&end[1..]).unwrap(), ReplayItem::End);
        assert_eq!(parse_replay_reply(&end[2..]).unwrap(), ReplayItem::End);
        assert!(parse_replay_reply(&end[..1]).is_err());
    }
}
