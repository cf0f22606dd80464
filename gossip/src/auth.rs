//! Cluster-key authentication of gossip datagrams (HMAC-SHA256 over the whole datagram).
//!
//! Layout: `[version: u8][tag: 32 bytes][foca packet]`. The tag covers the version byte and
//! the packet, so a packet from a node without the key, a truncated or altered one, or one
//! of another envelope version is rejected before foca parses a byte of it.

use std::fmt;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::Sha256;

/// Envelope version byte; bump when the layout changes.
pub const ENVELOPE_VERSION: u8 = 1;
/// Bytes the envelope adds to each datagram.
pub const ENVELOPE_OVERHEAD: usize = 1 + TAG_LEN;
const TAG_LEN: usize = 32;
/// Shortest accepted key, in bytes.
pub const MIN_KEY_LEN: usize = 16;

type HmacSha256 = Hmac<Sha256>;

/// The shared secret every mesh node holds; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterKey(Vec<u8>);

/// A cluster key that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidClusterKey {
    /// The key is shorter than [`MIN_KEY_LEN`] bytes.
    #[error("cluster key is {len} bytes; at least {MIN_KEY_LEN} are required")]
    TooShort {
        /// Length given.
        len: usize,
    },
}

impl ClusterKey {
    /// Wraps raw key bytes, refusing keys shorter than [`MIN_KEY_LEN`].
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<ClusterKey, InvalidClusterKey> {
        let bytes = bytes.into();
        if bytes.len() < MIN_KEY_LEN {
            return Err(InvalidClusterKey::TooShort { len: bytes.len() });
        }
        Ok(ClusterKey(bytes))
    }

    fn mac(&self) -> HmacSha256 {
        // HMAC accepts keys of any length, so this cannot fail.
        <HmacSha256 as Mac>::new_from_slice(&self.0).expect("hmac takes any key length")
    }

    /// Wraps a foca packet in an authenticated envelope.
    pub fn seal(&self, packet: &[u8], out: &mut Vec<u8>) {
        out.clear();
        out.reserve(ENVELOPE_OVERHEAD + packet.len());
        out.push(ENVELOPE_VERSION);
        let mut mac = self.mac();
        mac.update(&[ENVELOPE_VERSION]);
        mac.update(packet);
        out.extend_from_slice(&mac.finalize().into_bytes());
        out.extend_from_slice(packet);
    }

    /// Checks a datagram and returns the foca packet inside it.
    pub fn open<'a>(&self, datagram: &'a [u8]) -> Result<&'a [u8], Rejected> {
        if datagram.len() < ENVELOPE_OVERHEAD {
            return Err(Rejected::Malformed);
        }
        if datagram[0] != ENVELOPE_VERSION {
            return Err(Rejected::Malformed);
        }
        let (tag, packet) = datagram[1..].split_at(TAG_LEN);
        let mut mac = self.mac();
        mac.update(&[ENVELOPE_VERSION]);
        mac.update(packet);
        // Constant-time comparison.
        mac.verify_slice(tag).map_err(|_| Rejected::BadTag)?;
        Ok(packet)
    }
}

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClusterKey(<{} bytes redacted>)", self.0.len())
    }
}

impl Serialize for ClusterKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // Config round-trips never print secrets.
        s.serialize_str("<redacted>")
    }
}

impl<'de> Deserialize<'de> for ClusterKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ClusterKey::new(s.into_bytes()).map_err(serde::de::Error::custom)
    }
}

/// The key a node seals with and every key it opens with: the cluster key plus keys still
/// accepted during a rotation. A rotation is three rolling steps, each safe with nodes of
/// the previous step: (1) every node accepts the new key, (2) every node seals with the
/// new key and accepts the old one, (3) the old key is dropped.
#[derive(Clone, Debug)]
pub struct Keyring {
    seal: ClusterKey,
    accepted: Vec<ClusterKey>,
}

impl Keyring {
    /// Seals with `seal`; opens what `seal` or any of `accepted` sealed.
    pub fn new(seal: ClusterKey, accepted: Vec<ClusterKey>) -> Keyring {
        let accepted = accepted.into_iter().filter(|k| *k != seal).collect();
        Keyring { seal, accepted }
    }

    /// Wraps a foca packet with the sealing key.
    pub fn seal(&self, packet: &[u8], out: &mut Vec<u8>) {
        self.seal.seal(packet, out);
    }

    /// Opens a datagram sealed with any key of the ring (the sealing key first, as almost
    /// every datagram is sealed with it).
    pub fn open<'a>(&self, datagram: &'a [u8]) -> Result<&'a [u8], Rejected> {
        match self.seal.open(datagram) {
            Err(Rejected::BadTag) => {}
            other => return other,
        }
        for k in &self.accepted {
            if let Ok(p) = k.open(datagram) {
                return Ok(p);
            }
        }
        Err(Rejected::BadTag)
    }
}

/// Why a datagram was dropped before reaching foca.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// Too short or of an unknown envelope version.
    Malformed,
    /// The HMAC tag does not match: wrong key or altered packet.
    BadTag,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_then_open_roundtrips() {
        let k = ClusterKey::new(b"0123456789abcdef".to_vec()).unwrap();
        let mut out = Vec::new();
        k.seal(b"hello foca", &mut out);
        assert_eq!(k.open(&out).unwrap(), b"hello foca");
    }

    #[test]
    fn wrong_key_altered_and_short_are_rejected() {
        let k = ClusterKey::new(b"0123456789abcdef".to_vec()).unwrap();
        let other = ClusterKey::new(b"fedcba9876543210".to_vec()).unwrap();
        let mut out = Vec::new();
        k.seal(b"payload", &mut out);
        assert_eq!(other.open(&out), Err(Rejected::BadTag));
        let mut altered = out.clone();
        *altered.last_mut().unwrap() ^= 1;
        assert_eq!(k.open(&altered), Err(Rejected::BadTag));
        assert_eq!(k.open(&out[..10]), Err(Rejected::Malformed));
        let mut v2 = out.clone();
        v2[0] = 2;
        assert_eq!(k.open(&v2), Err(Rejected::Malformed));
    }

    #[test]
    fn a_keyring_opens_what_any_of_its_keys_sealed_and_seals_with_one() {
        let old = ClusterKey::new(b"old-key-0123456789".to_vec()).unwrap();
        let new = ClusterKey::new(b"new-key-0123456789".to_vec()).unwrap();
        let stranger = ClusterKey::new(b"stranger-0123456789".to_vec()).unwrap();
        let step2 = Keyring::new(new.clone(), vec![old.clone()]);
        let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
        old.seal(b"from an old node", &mut a);
        new.seal(b"from a new node", &mut b);
        stranger.seal(b"from outside", &mut c);
        assert_eq!(step2.open(&a).unwrap(), b"from an old node");
        assert_eq!(step2.open(&b).unwrap(), b"from a new node");
        assert_eq!(step2.open(&c), Err(Rejected::BadTag));
        let mut sealed = Vec::new();
        step2.seal(b"x", &mut sealed);
        assert!(new.open(&sealed).is_ok() && old.open(&sealed).is_err());
        assert_eq!(step2.open(&a[..5]), Err(Rejected::Malformed));
    }

    #[test]
    fn short_keys_are_refused_and_debug_redacts() {
        assert_eq!(
            ClusterKey::new(b"short".to_vec()),
            Err(InvalidClusterKey::TooShort { len: 5 })
        );
        let k = ClusterKey::new(b"0123456789abcdef".to_vec()).unwrap();
        assert!(!format!("{k:?}").contains("0123"));
    }
}
