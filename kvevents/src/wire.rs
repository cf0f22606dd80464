//! The msgpack payload of one ZMQ message: an [`EventBatch`] of [`KvEvent`]s, sans-IO.
//!
//! vLLM encodes its msgspec structs in two ways. The original form (`array_like=True,
//! tag=True`) writes each event as a positional array whose first element is the class
//! name: `["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id,
//! medium, lora_name, …]`. vLLM PR #42892 switched events to maps keyed by field name with
//! the class name under `"type"`. [`encode`] writes either ([`Encoding`]); [`decode`] reads
//! both, also mixed within one batch, and also a batch that is itself a map
//! (`{"ts", "events", "data_parallel_rank"}`), which is what msgspec writes for the batch
//! once `array_like` is gone. Fields with a default (`extra_keys`, `group_idx`,
//! `kv_cache_spec_*`, the batch's `data_parallel_rank`) are omitted when unset, as msgspec's
//! `omit_defaults` does: trailing ones in the array form, absent keys in the map form.
//!
//! Block hashes arrive as integers (`VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1`, the default;
//! unsigned, or negative when a producer wrote an i64) or as bytes (the full hash). Both
//! are normalized to a `u64`: an integer is taken bit for bit, bytes by their last 8 bytes
//! big-endian, shorter ones left-padded with zeros (llm-d's `getHashAsUint64`), so one
//! engine hash has one key whichever way it was sent.

use rmpv::Value;

/// Event class names, the msgspec tags.
const BLOCK_STORED: &str = "BlockStored";
const BLOCK_REMOVED: &str = "BlockRemoved";
const ALL_BLOCKS_CLEARED: &str = "AllBlocksCleared";

/// Deepest nesting accepted: a batch holds events holding `extra_keys` tuples; anything
/// deeper is not vLLM's and must not cost stack.
const MAX_DEPTH: usize = 32;

/// Medium of blocks in GPU memory (vLLM's `MEDIUM_GPU`).
pub const MEDIUM_GPU: &str = "GPU";

/// One published batch: the events of one engine step.
#[derive(Debug, Clone, PartialEq)]
pub struct EventBatch {
    /// Wall-clock time of the step, Unix seconds.
    pub ts: f64,
    /// The events, in the order the engine produced them.
    pub events: Vec<KvEvent>,
    /// Data-parallel rank of the publishing engine, when set.
    pub data_parallel_rank: Option<i64>,
}

/// A KV-cache event, with vLLM's field names in vLLM's order.
#[derive(Debug, Clone, PartialEq)]
pub enum KvEvent {
    /// Full blocks gained a hash (they can be hit by later requests).
    BlockStored {
        /// Hashes of the stored blocks, parent first.
        block_hashes: Vec<u64>,
        /// Hash of the block before the first stored one; `None` at the start of a prompt.
        parent_block_hash: Option<u64>,
        /// Tokens of all stored blocks, concatenated (`block_size` per block).
        token_ids: Vec<u32>,
        /// Tokens per block.
        block_size: u32,
        /// LoRA adapter id (deprecated by vLLM in favour of `lora_name`).
        lora_id: Option<i64>,
        /// Where the blocks live (`"GPU"`, `"CPU"`, …).
        medium: Option<String>,
        /// LoRA adapter name, part of the block key.
        lora_name: Option<String>,
        /// Per-block extra hash inputs (multimodal ids, cache salt), passed through as-is.
        extra_keys: Option<Value>,
        /// KV-cache group of the blocks (hybrid models).
        group_idx: Option<i64>,
        /// Kind of the group's KV-cache spec.
        kv_cache_spec_kind: Option<String>,
        /// Sliding window of the group's KV-cache spec.
        kv_cache_spec_sliding_window: Option<i64>,
    },
    /// Cached blocks were evicted (their hashes no longer hit).
    BlockRemoved {
        /// Hashes of the evicted blocks.
        block_hashes: Vec<u64>,
        /// Where the blocks lived.
        medium: Option<String>,
        /// KV-cache group of the blocks.
        group_idx: Option<i64>,
    },
    /// The whole prefix cache was reset.
    AllBlocksCleared,
}

impl KvEvent {
    /// The msgspec tag of this event.
    pub fn tag(&self) -> &'static str {
        match self {
            KvEvent::BlockStored { .. } => BLOCK_STORED,
            KvEvent::BlockRemoved { .. } => BLOCK_REMOVED,
            KvEvent::AllBlocksCleared => ALL_BLOCKS_CLEARED,
        }
    }
}

/// How events are laid out on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Encoding {
    /// vLLM's positional tagged arrays `[tag, field1, field2, …]` (before PR #42892).
    #[default]
    Array,
    /// Maps with a `"type"` tag (vLLM PR #42892); the outer batch stays an array.
    Map,
}

impl std::str::FromStr for Encoding {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "array" => Ok(Encoding::Array),
            "map" => Ok(Encoding::Map),
            _ => Err(format!("unknown KV-event encoding `{s}` (array or map)")),
        }
    }
}

/// How block hashes are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HashFormat {
    /// Unsigned integers (`VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1`, vLLM's default).
    #[default]
    Int,
    /// 8 bytes big-endian, as a `bin` (what a consumer sees of vLLM's byte hashes).
    Bytes,
}

/// An event a decoder skipped because its tag is not one it knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedEvent {
    /// Position in the batch's event list.
    pub index: usize,
    /// Its tag, as sent.
    pub tag: String,
}

/// A decoded payload and the events it had to skip.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    /// The batch with every known event.
    pub batch: EventBatch,
    /// Events of unknown type, left out of `batch.events` (count them; the rest applies).
    pub skipped: Vec<SkippedEvent>,
}

/// Why a payload could not be decoded; nothing of the batch should be applied.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Not valid msgpack (truncated, bad marker, nested too deep).
    #[error("invalid msgpack: {0}")]
    Msgpack(#[from] rmpv::decode::Error),
    /// A complete value was followed by more bytes.
    #[error("{0} bytes after the batch")]
    TrailingBytes(usize),
    /// The top-level value is neither an array nor a map.
    #[error("the batch is not an array or a map")]
    NotABatch,
    /// A required field is absent.
    #[error("{at}: missing field `{field}`")]
    MissingField {
        /// Struct being decoded.
        at: &'static str,
        /// The field.
        field: &'static str,
    },
    /// A field has the wrong msgpack type or an out-of-range value.
    #[error("{at}: field `{field}` is not {expected}")]
    WrongType {
        /// Struct being decoded.
        at: &'static str,
        /// The field.
        field: &'static str,
        /// What was expected.
        expected: &'static str,
    },
    /// An event is neither a tagged array nor a map with a string `"type"`.
    #[error("event {index} has no tag")]
    MissingTag {
        /// Position in the batch.
        index: usize,
    },
}

/// Encodes `batch` in `encoding` with integer block hashes (vLLM's default).
pub fn encode(batch: &EventBatch, encoding: Encoding) -> Vec<u8> {
    encode_with(batch, encoding, HashFormat::Int)
}

/// Encodes `batch` in `encoding`, writing block hashes as `hashes` says.
pub fn encode_with(batch: &EventBatch, encoding: Encoding, hashes: HashFormat) -> Vec<u8> {
    let mut outer = vec![
        Value::F64(batch.ts),
        Value::Array(
            batch
                .events
                .iter()
                .map(|e| event_value(e, encoding, hashes))
                .collect(),
        ),
    ];
    if let Some(r) = batch.data_parallel_rank {
        outer.push(Value::from(r));
    }
    let mut buf = Vec::with_capacity(64);
    rmpv::encode::write_value(&mut buf, &Value::Array(outer))
        .expect("writing msgpack into a Vec cannot fail");
    buf
}

fn hash_value(h: u64, f: HashFormat) -> Value {
    match f {
        HashFormat::Int => Value::from(h),
        HashFormat::Bytes => Value::Binary(h.to_be_bytes().to_vec()),
    }
}

fn opt<T: Into<Value>>(v: Option<T>) -> Value {
    v.map_or(Value::Nil, Into::into)
}

fn event_value(e: &KvEvent, encoding: Encoding, hf: HashFormat) -> Value {
    let hashes = |hs: &[u64]| Value::Array(hs.iter().map(|&h| hash_value(h, hf)).collect());
    // (name, value) pairs in vLLM's field order; `defaulted` marks fields msgspec omits
    // when unset.
    let mut fields: Vec<(&'static str, Value, bool)> = Vec::new();
    match e {
        KvEvent::BlockStored {
            block_hashes,
            parent_block_hash,
            token_ids,
            block_size,
            lora_id,
            medium,
            lora_name,
            extra_keys,
            group_idx,
            kv_cache_spec_kind,
            kv_cache_spec_sliding_window,
        } => {
            fields.push(("block_hashes", hashes(block_hashes), false));
            fields.push((
                "parent_block_hash",
                parent_block_hash.map_or(Value::Nil, |h| hash_value(h, hf)),
                false,
            ));
            fields.push((
                "token_ids",
                Value::Array(token_ids.iter().map(|&t| Value::from(t)).collect()),
                false,
            ));
            fields.push(("block_size", Value::from(*block_size), false));
            fields.push(("lora_id", opt(*lora_id), false));
            fields.push(("medium", opt(medium.as_deref()), false));
            fields.push(("lora_name", opt(lora_name.as_deref()), false));
            fields.push(("extra_keys", extra_keys.clone().unwrap_or(Value::Nil), true));
            fields.push(("group_idx", opt(*group_idx), true));
            fields.push((
                "kv_cache_spec_kind",
                opt(kv_cache_spec_kind.as_deref()),
                true,
            ));
            fields.push((
                "kv_cache_spec_sliding_window",
                opt(*kv_cache_spec_sliding_window),
                true,
            ));
        }
        KvEvent::BlockRemoved {
            block_hashes,
            medium,
            group_idx,
        } => {
            fields.push(("block_hashes", hashes(block_hashes), false));
            fields.push(("medium", opt(medium.as_deref()), false));
            fields.push(("group_idx", opt(*group_idx), true));
        }
        KvEvent::AllBlocksCleared => {}
    }
    match encoding {
        Encoding::Array => {
            // Positional: only trailing defaulted fields can be dropped.
            while fields.last().is_some_and(|(_, v, d)| *d && v.is_nil()) {
                fields.pop();
            }
            let mut a = Vec::with_capacity(fields.len() + 1);
            a.push(Value::from(e.tag()));
            a.extend(fields.into_iter().map(|(_, v, _)| v));
            Value::Array(a)
        }
        Encoding::Map => {
            let mut m = Vec::with_capacity(fields.len() + 1);
            m.push((Value::from("type"), Value::from(e.tag())));
            m.extend(
                fields
                    .into_iter()
                    .filter(|(_, v, d)| !(*d && v.is_nil()))
                    .map(|(k, v, _)| (Value::from(k), v)),
            );
            Value::Map(m)
        }
    }
}

/// Decodes one payload in either encoding (or a mix); unknown event types are skipped and
/// reported in [`Decoded::skipped`], any other problem rejects the whole batch.
pub fn decode(buf: &[u8]) -> Result<Decoded, DecodeError> {
    let mut rd = buf;
    let v = rmpv::decode::read_value_with_max_depth(&mut rd, MAX_DEPTH)?;
    if !rd.is_empty() {
        return Err(DecodeError::TrailingBytes(rd.len()));
    }
    let at = "EventBatch";
    let (ts, events, rank) = match v {
        Value::Array(a) => {
            let mut it = a.into_iter();
            (it.next(), it.next(), it.next())
        }
        Value::Map(m) => {
            let mut f = Fields::new(m);
            (f.take("ts"), f.take("events"), f.take("data_parallel_rank"))
        }
        _ => return Err(DecodeError::NotABatch),
    };
    let ts = as_f64(
        ts.ok_or(DecodeError::MissingField { at, field: "ts" })?,
        at,
        "ts",
    )?;
    let Some(Value::Array(raw)) = events else {
        return Err(missing_or_wrong(events.is_none(), at, "events", "an array"));
    };
    let data_parallel_rank = opt_i64(rank, at, "data_parallel_rank")?;
    let mut batch = EventBatch {
        ts,
        events: Vec::with_capacity(raw.len()),
        data_parallel_rank,
    };
    let mut skipped = Vec::new();
    for (index, ev) in raw.into_iter().enumerate() {
        match decode_event(index, ev)? {
            Ok(e) => batch.events.push(e),
            Err(tag) => skipped.push(SkippedEvent { index, tag }),
        }
    }
    Ok(Decoded { batch, skipped })
}

fn missing_or_wrong(
    missing: bool,
    at: &'static str,
    field: &'static str,
    expected: &'static str,
) -> DecodeError {
    if missing {
        DecodeError::MissingField { at, field }
    } else {
        DecodeError::WrongType {
            at,
            field,
            expected,
        }
    }
}

/// Named fields of a map-form struct, looked up by key.
struct Fields(Vec<(Value, Value)>);

impl Fields {
    fn new(m: Vec<(Value, Value)>) -> Self {
        Self(m)
    }

    fn take(&mut self, key: &str) -> Option<Value> {
        let i = self.0.iter().position(|(k, _)| k.as_str() == Some(key))?;
        Some(self.0.swap_remove(i).1)
    }
}

/// An event's fields, by position (array form, after the tag) or by name (map form).
enum EventFields {
    Positional(Vec<Option<Value>>),
    Named(Fields),
}

impl EventFields {
    /// Field `name`, the `pos`-th after the tag; taken out, so each is read once.
    fn get(&mut self, pos: usize, name: &str) -> Option<Value> {
        match self {
            EventFields::Positional(v) => v.get_mut(pos).and_then(Option::take),
            EventFields::Named(f) => f.take(name),
        }
    }
}

/// The event's fields in vLLM's order, whichever form it came in; `Err(tag)` for an
/// unknown type.
fn decode_event(index: usize, ev: Value) -> Result<Result<KvEvent, String>, DecodeError> {
    let (tag, mut fields) = match ev {
        Value::Array(a) => {
            let mut it = a.into_iter();
            let tag = it.next();
            (tag, EventFields::Positional(it.map(Some).collect()))
        }
        Value::Map(m) => {
            let mut f = Fields::new(m);
            (f.take("type"), EventFields::Named(f))
        }
        _ => return Err(DecodeError::MissingTag { index }),
    };
    let Some(tag) = tag.and_then(|t| match t {
        Value::String(s) => s.into_str(),
        _ => None,
    }) else {
        return Err(DecodeError::MissingTag { index });
    };
    let mut get = |pos: usize, name: &str| fields.get(pos, name);
    let e = match tag.as_str() {
        BLOCK_STORED => {
            let at = BLOCK_STORED;
            KvEvent::BlockStored {
                block_hashes: hash_list(get(0, "block_hashes"), at)?,
                parent_block_hash: match get(1, "parent_block_hash") {
                    None | Some(Value::Nil) => None,
                    Some(v) => Some(hash_of(v, at, "parent_block_hash")?),
                },
                token_ids: token_list(get(2, "token_ids"), at)?,
                block_size: {
                    let v = get(3, "block_size").ok_or(DecodeError::MissingField {
                        at,
                        field: "block_size",
                    })?;
                    v.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or(
                        DecodeError::WrongType {
                            at,
                            field: "block_size",
                            expected: "a u32",
                        },
                    )?
                },
                lora_id: opt_i64(get(4, "lora_id"), at, "lora_id")?,
                medium: opt_str(get(5, "medium"), at, "medium")?,
                lora_name: opt_str(get(6, "lora_name"), at, "lora_name")?,
                extra_keys: get(7, "extra_keys").filter(|v| !v.is_nil()),
                group_idx: opt_i64(get(8, "group_idx"), at, "group_idx")?,
                kv_cache_spec_kind: opt_str(
                    get(9, "kv_cache_spec_kind"),
                    at,
                    "kv_cache_spec_kind",
                )?,
                kv_cache_spec_sliding_window: opt_i64(
                    get(10, "kv_cache_spec_sliding_window"),
                    at,
                    "kv_cache_spec_sliding_window",
                )?,
            }
        }
        BLOCK_REMOVED => {
            let at = BLOCK_REMOVED;
            KvEvent::BlockRemoved {
                block_hashes: hash_list(get(0, "block_hashes"), at)?,
                medium: opt_str(get(1, "medium"), at, "medium")?,
                group_idx: opt_i64(get(2, "group_idx"), at, "group_idx")?,
            }
        }
        ALL_BLOCKS_CLEARED => KvEvent::AllBlocksCleared,
        _ => return Ok(Err(tag)),
    };
    Ok(Ok(e))
}

/// A block hash: an integer bit for bit, or bytes by their last 8 bytes big-endian.
fn hash_of(v: Value, at: &'static str, field: &'static str) -> Result<u64, DecodeError> {
    let wrong = DecodeError::WrongType {
        at,
        field,
        expected: "an integer or non-empty bytes hash",
    };
    match v {
        Value::Integer(i) => i
            .as_u64()
            .or_else(|| i.as_i64().map(|n| n as u64))
            .ok_or(wrong),
        Value::Binary(b) if !b.is_empty() => Ok(hash_from_bytes(&b)),
        _ => Err(wrong),
    }
}

/// The `u64` key of a byte hash: its last 8 bytes big-endian, shorter ones left-padded.
pub fn hash_from_bytes(b: &[u8]) -> u64 {
    let tail = &b[b.len().saturating_sub(8)..];
    let mut buf = [0u8; 8];
    buf[8 - tail.len()..].copy_from_slice(tail);
    u64::from_be_bytes(buf)
}

fn hash_list(v: Option<Value>, at: &'static str) -> Result<Vec<u64>, DecodeError> {
    let field = "block_hashes";
    match v {
        Some(Value::Array(a)) => a.into_iter().map(|h| hash_of(h, at, field)).collect(),
        other => Err(missing_or_wrong(other.is_none(), at, field, "an array")),
    }
}

fn token_list(v: Option<Value>, at: &'static str) -> Result<Vec<u32>, DecodeError> {
    let field = "token_ids";
    let wrong = || DecodeError::WrongType {
        at,
        field,
        expected: "an array of u32",
    };
    match v {
        // A CPU-offload store carries no tokens: vLLM may send nil.
        Some(Value::Nil) => Ok(Vec::new()),
        Some(Value::Array(a)) => a
            .into_iter()
            .map(|t| {
                t.as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(wrong)
            })
            .collect(),
        other => Err(missing_or_wrong(other.is_none(), at, field, "an array")),
    }
}

fn as_f64(v: Value, at: &'static str, field: &'static str) -> Result<f64, DecodeError> {
    match v {
        Value::F64(f) => Ok(f),
        Value::F32(f) => Ok(f64::from(f)),
        Value::Integer(i) => i.as_f64().ok_or(DecodeError::WrongType {
            at,
            field,
            expected: "a number",
        }),
        _ => Err(DecodeError::WrongType {
            at,
            field,
            expected: "a number",
        }),
    }
}

fn opt_i64(
    v: Option<Value>,
    at: &'static str,
    field: &'static str,
) -> Result<Option<i64>, DecodeError> {
    match v {
        None | Some(Value::Nil) => Ok(None),
        Some(v) => v.as_i64().map(Some).ok_or(DecodeError::WrongType {
            at,
            field,
            expected: "an i64",
        }),
    }
}

fn opt_str(
    v: Option<Value>,
    at: &'static str,
    field: &'static str,
) -> Result<Option<String>, DecodeError> {
    match v {
        None | Some(Value::Nil) => Ok(None),
        Some(Value::String(s)) => s.into_str().map(Some).ok_or(DecodeError::WrongType {
            at,
            field,
            expected: "a UTF-8 string",
        }),
        Some(_) => Err(DecodeError::WrongType {
            at,
            field,
            expected: "a string",
        }),
    }
}

#[cfg(test)]
mod tests;
