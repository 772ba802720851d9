//! Wire codecs: a request or message body → a list of items, each with its raw bytes.
//!
//! Decoding is split from validation so that one bad element of a batch is
//! rejected on its own (with its raw bytes kept) while its neighbours go on.
//! Only a body that cannot be split into items at all fails as a whole.

use serde_json::{Map, Number, Value};

use super::cost::format_nanos_short;
use super::validate::{describe, ValidationError};
use super::{format_ts, Event};

/// The content types `POST /v1/events` and NATS messages may carry.
pub const SUPPORTED_CONTENT_TYPES: &[&str] = &[
    "application/json",
    "application/x-ndjson",
    "application/msgpack",
    "application/cloudevents+json",
    "application/cloudevents-batch+json",
];

/// How a body is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// One object or an array of objects (CloudEvents objects are recognised inside too).
    Json,
    /// One JSON object per line.
    Ndjson,
    /// A MessagePack map or an array of maps.
    MsgPack,
    /// One CloudEvents 1.0 event in structured JSON mode.
    CloudEvents,
    /// A JSON array of CloudEvents 1.0 events.
    CloudEventsBatch,
}

impl Encoding {
    /// The encoding named by a `Content-Type` header; sniffed from the body when absent.
    pub fn detect(content_type: Option<&str>, body: &[u8]) -> Result<Self, CodecError> {
        let essence = content_type
            .map(|ct| {
                ct.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase()
            })
            .filter(|ct| !ct.is_empty());
        match essence.as_deref() {
            // curl's `-d` default and generic types: look at the bytes instead.
            None
            | Some("application/octet-stream")
            | Some("application/x-www-form-urlencoded")
            | Some("text/plain") => Ok(Self::sniff(body)),
            Some("application/json") | Some("text/json") => Ok(Self::Json),
            Some("application/x-ndjson")
            | Some("application/ndjson")
            | Some("application/jsonl")
            | Some("application/x-jsonlines") => Ok(Self::Ndjson),
            Some("application/msgpack")
            | Some("application/x-msgpack")
            | Some("application/vnd.msgpack") => Ok(Self::MsgPack),
            Some("application/cloudevents+json") => Ok(Self::CloudEvents),
            Some("application/cloudevents-batch+json") => Ok(Self::CloudEventsBatch),
            Some(other) => Err(CodecError::UnsupportedMediaType(other.to_string())),
        }
    }

    /// JSON bodies start with `{` or `[`; MessagePack maps and arrays never do.
    fn sniff(body: &[u8]) -> Self {
        let first = body.iter().find(|b| !b.is_ascii_whitespace());
        match first {
            Some(b'[') => Self::Json,
            Some(b'{') => {
                // Several top-level objects: NDJSON.
                let mut stream = serde_json::Deserializer::from_slice(body)
                    .into_iter::<&serde_json::value::RawValue>();
                let _ = stream.next();
                match stream.next() {
                    Some(_) => Self::Ndjson,
                    None => Self::Json,
                }
            }
            _ => Self::MsgPack,
        }
    }

    /// The canonical content type, as stored with rejected payloads.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Json => "application/json",
            Self::Ndjson => "application/x-ndjson",
            Self::MsgPack => "application/msgpack",
            Self::CloudEvents => "application/cloudevents+json",
            Self::CloudEventsBatch => "application/cloudevents-batch+json",
        }
    }
}

/// Why a body as a whole could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The `Content-Type` is not one Tally reads.
    #[error("unsupported content type `{0}`; supported: {list}", list = SUPPORTED_CONTENT_TYPES.join(", "))]
    UnsupportedMediaType(String),
    /// The bytes are not valid in the encoding.
    #[error("{0}")]
    Unparseable(String),
    /// The body decoded to zero events.
    #[error("the body holds no events; send one event object or a non-empty array of them")]
    Empty,
    /// More events than one body may carry.
    #[error(
        "the body holds {count} events; at most {max} are accepted per request, split the batch"
    )]
    TooManyEvents {
        /// Events found.
        count: usize,
        /// The configured limit.
        max: usize,
    },
}

/// One element of a body: its raw bytes, and its decoded map or why it failed.
#[derive(Debug)]
pub struct Item {
    /// The element's bytes as received (re-encoded for MessagePack array elements).
    pub raw: Vec<u8>,
    /// The flat event map (CloudEvents already unwrapped), or the item-level error.
    pub value: Result<Value, ValidationError>,
}

/// Splits a body into items. `max_events` bounds the work done on hostile input.
pub fn decode_body(
    body: &[u8],
    encoding: Encoding,
    max_events: usize,
) -> Result<Vec<Item>, CodecError> {
    let items = match encoding {
        Encoding::Json | Encoding::CloudEvents | Encoding::CloudEventsBatch => {
            decode_json(body, encoding, max_events)?
        }
        Encoding::Ndjson => decode_ndjson(body, max_events)?,
        Encoding::MsgPack => decode_msgpack(body, max_events)?,
    };
    if items.is_empty() {
        return Err(CodecError::Empty);
    }
    Ok(items)
}

fn too_many(count: usize, max: usize) -> Result<(), CodecError> {
    if count > max {
        Err(CodecError::TooManyEvents { count, max })
    } else {
        Ok(())
    }
}

fn decode_json(body: &[u8], encoding: Encoding, max: usize) -> Result<Vec<Item>, CodecError> {
    use serde_json::value::RawValue;
    let invalid = |e: serde_json::Error| CodecError::Unparseable(format!("invalid JSON: {e}"));
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    let raws: Vec<&RawValue> = match first {
        Some(b'[') => serde_json::from_slice(body).map_err(invalid)?,
        Some(b'{') => vec![serde_json::from_slice(body).map_err(invalid)?],
        None => return Err(CodecError::Unparseable("the body is empty".into())),
        Some(_) => {
            // Valid JSON that is neither object nor array gets a precise message.
            let v: Value = serde_json::from_slice(body).map_err(invalid)?;
            return Err(CodecError::Unparseable(format!(
                "the body must be a JSON object or an array of objects, got {}",
                describe(&v)
            )));
        }
    };
    too_many(raws.len(), max)?;
    let cloud = matches!(encoding, Encoding::CloudEvents | Encoding::CloudEventsBatch);
    Ok(raws
        .into_iter()
        .map(|raw| {
            let value = serde_json::from_str::<Value>(raw.get())
                .map_err(|e| ValidationError::single(None, format!("invalid JSON: {e}")))
                .and_then(|v| unwrap_cloudevent(v, cloud));
            Item {
                raw: raw.get().as_bytes().to_vec(),
                value,
            }
        })
        .collect())
}

fn decode_ndjson(body: &[u8], max: usize) -> Result<Vec<Item>, CodecError> {
    let lines: Vec<&[u8]> = body
        .split(|b| *b == b'\n')
        .map(|l| l.trim_ascii())
        .filter(|l| !l.is_empty())
        .collect();
    too_many(lines.len(), max)?;
    Ok(lines
        .into_iter()
        .map(|line| Item {
            raw: line.to_vec(),
            value: serde_json::from_slice::<Value>(line)
                .map_err(|e| {
                    ValidationError::single(None, format!("invalid JSON on this line: {e}"))
                })
                .and_then(|v| unwrap_cloudevent(v, false)),
        })
        .collect())
}

fn decode_msgpack(body: &[u8], max: usize) -> Result<Vec<Item>, CodecError> {
    let mut cursor = body;
    let top = rmpv::decode::read_value(&mut cursor)
        .map_err(|e| CodecError::Unparseable(format!("invalid MessagePack: {e}")))?;
    if !cursor.is_empty() {
        return Err(CodecError::Unparseable(format!(
            "invalid MessagePack: {} trailing bytes after the first value",
            cursor.len()
        )));
    }
    let elements = match top {
        rmpv::Value::Array(a) => a,
        m @ rmpv::Value::Map(_) => vec![m],
        other => {
            return Err(CodecError::Unparseable(format!(
                "the MessagePack body must be a map or an array of maps, got {}",
                msgpack_kind(&other)
            )))
        }
    };
    too_many(elements.len(), max)?;
    Ok(elements
        .into_iter()
        .map(|el| {
            let mut raw = Vec::new();
            // Writing to a Vec cannot fail.
            let _ = rmpv::encode::write_value(&mut raw, &el);
            let value = msgpack_to_json(el, "")
                .map_err(|m| ValidationError::single(None, m))
                .and_then(|v| unwrap_cloudevent(v, false));
            Item { raw, value }
        })
        .collect())
}

fn msgpack_kind(v: &rmpv::Value) -> &'static str {
    match v {
        rmpv::Value::Nil => "nil",
        rmpv::Value::Boolean(_) => "a boolean",
        rmpv::Value::Integer(_) => "an integer",
        rmpv::Value::F32(_) | rmpv::Value::F64(_) => "a float",
        rmpv::Value::String(_) => "a string",
        rmpv::Value::Binary(_) => "binary data",
        rmpv::Value::Array(_) => "an array",
        rmpv::Value::Map(_) => "a map",
        rmpv::Value::Ext(..) => "an extension value",
    }
}

/// MessagePack → the JSON data model, so both encodings share one validator.
fn msgpack_to_json(v: rmpv::Value, path: &str) -> Result<Value, String> {
    let at = |p: &str| {
        if p.is_empty() {
            String::new()
        } else {
            format!("field `{p}`: ")
        }
    };
    Ok(match v {
        rmpv::Value::Nil => Value::Null,
        rmpv::Value::Boolean(b) => Value::Bool(b),
        rmpv::Value::Integer(i) => match (i.as_i64(), i.as_u64()) {
            (Some(n), _) => Value::Number(n.into()),
            (None, Some(n)) => Value::Number(n.into()),
            _ => return Err(format!("{}integer out of range", at(path))),
        },
        rmpv::Value::F32(f) => {
            float(f64::from(f)).ok_or_else(|| format!("{}not a finite number", at(path)))?
        }
        rmpv::Value::F64(f) => {
            float(f).ok_or_else(|| format!("{}not a finite number", at(path)))?
        }
        rmpv::Value::String(s) => match s.into_str() {
            Some(s) => Value::String(s),
            None => return Err(format!("{}string is not valid UTF-8", at(path))),
        },
        rmpv::Value::Array(a) => Value::Array(
            a.into_iter()
                .map(|x| msgpack_to_json(x, path))
                .collect::<Result<_, _>>()?,
        ),
        rmpv::Value::Map(entries) => {
            let mut map = Map::new();
            for (k, val) in entries {
                let rmpv::Value::String(k) = k else {
                    return Err(format!(
                        "{}map keys must be strings, got {}",
                        at(path),
                        msgpack_kind(&k)
                    ));
                };
                let Some(k) = k.into_str() else {
                    return Err(format!("{}map key is not valid UTF-8", at(path)));
                };
                let child = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                let val = msgpack_to_json(val, &child)?;
                map.insert(k, val);
            }
            Value::Object(map)
        }
        rmpv::Value::Binary(_) => {
            return Err(format!(
                "{}binary values are not accepted; send a string",
                at(path)
            ))
        }
        rmpv::Value::Ext(..) => {
            return Err(format!(
                "{}MessagePack extension types are not accepted",
                at(path)
            ))
        }
    })
}

/// A float as a JSON number whose text is its shortest round-trip decimal.
fn float(f: f64) -> Option<Value> {
    Number::from_f64(f).map(Value::Number)
}

/// Flattens a CloudEvent into a Tally event map: `id` → id, `time` → ts,
/// `subject` → key, and the fields of `data`. Other objects pass through unless
/// `require` says the body was declared as CloudEvents.
fn unwrap_cloudevent(v: Value, require: bool) -> Result<Value, ValidationError> {
    let Value::Object(mut ce) = v else {
        return Ok(v);
    };
    if !ce.contains_key("specversion") {
        if require {
            return Err(ValidationError::single(
                Some("specversion"),
                "is required: the content type says CloudEvents, but this object is not a CloudEvent",
            ));
        }
        return Ok(Value::Object(ce));
    }
    let err = |field: &str, msg: String| Err(ValidationError::single(Some(field), msg));
    match ce.get("specversion").and_then(Value::as_str) {
        Some("1.0") => {}
        _ => return err("specversion", "must be \"1.0\" (CloudEvents 1.0)".into()),
    }
    for required in ["id", "source", "type"] {
        if !ce.get(required).is_some_and(Value::is_string) {
            return err(
                required,
                "is a required CloudEvents attribute (a string)".into(),
            );
        }
    }
    if ce.contains_key("data_base64") {
        return err(
            "data_base64",
            "is not supported; send `data` as a JSON object".into(),
        );
    }
    if let Some(ct) = ce.get("datacontenttype").and_then(Value::as_str) {
        if !ct.contains("json") {
            return err(
                "datacontenttype",
                format!("must be a JSON type, got {ct:?}"),
            );
        }
    }
    let mut out = match ce.remove("data") {
        Some(Value::Object(m)) => m,
        None | Some(Value::Null) => Map::new(),
        Some(other) => {
            return err(
                "data",
                format!(
                    "must be an object of event fields, got {}",
                    describe(&other)
                ),
            )
        }
    };
    for (attr, field) in [("id", "id"), ("time", "ts"), ("subject", "key")] {
        if let Some(value) = ce.remove(attr) {
            if out.contains_key(field) {
                return err(
                    &format!("data.{field}"),
                    format!(
                        "conflicts with the CloudEvents `{attr}` attribute; set it in one place"
                    ),
                );
            }
            out.insert(field.to_string(), value);
        }
    }
    // What is left in `ce` (source, type, extension attributes) is legal CloudEvents
    // but not part of the usage event: dropped by design, documented in README.
    Ok(Value::Object(out))
}

/// The wire JSON of a stored event (what `tally export` and conflict records carry).
pub fn to_wire_json(e: &Event) -> Value {
    let mut m = Map::new();
    let mut put = |k: &str, v: Value| {
        m.insert(k.to_string(), v);
    };
    put("id", Value::String(e.id.clone()));
    put("ts", Value::String(format_ts(&e.ts)));
    put("api", Value::String(e.api.clone()));
    for (k, v) in [
        ("endpoint", &e.endpoint),
        ("method", &e.method),
        ("key", &e.key),
        ("user", &e.user),
        ("model", &e.model),
    ] {
        if let Some(v) = v {
            put(k, Value::String(v.clone()));
        }
    }
    if let Some(s) = e.status {
        put("status", Value::Number(s.into()));
    }
    put("success", Value::Bool(e.success));
    if let Some(t) = e.error_type {
        put("error_type", Value::String(t.as_str().into()));
    }
    if let Some(msg) = &e.error_message {
        put("error_message", Value::String(msg.clone()));
    }
    if let Some(l) = e.latency_ms.and_then(float) {
        put("latency_ms", l);
    }
    for (k, v) in [
        ("request_bytes", e.request_bytes),
        ("response_bytes", e.response_bytes),
        ("tokens_in", e.tokens_in),
        ("tokens_out", e.tokens_out),
    ] {
        if let Some(v) = v {
            put(k, Value::Number(v.into()));
        }
    }
    if let Some(c) = e.cost_nanos {
        put("cost", Value::String(format_nanos_short(c)));
    }
    put("cached", Value::Bool(e.cached));
    if !e.metadata.is_empty() {
        let md = e
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        put("metadata", Value::Object(md));
    }
    Value::Object(m)
}

/// Encodes a JSON value as MessagePack (integers stay integers, decimals
/// stay strings), for producers such as `tally emit`.
pub fn to_msgpack(v: &Value) -> Vec<u8> {
    fn convert(v: &Value) -> rmpv::Value {
        match v {
            Value::Null => rmpv::Value::Nil,
            Value::Bool(b) => rmpv::Value::Boolean(*b),
            Value::Number(n) => {
                if let Some(i) = n.as_i64() {
                    rmpv::Value::from(i)
                } else if let Some(u) = n.as_u64() {
                    rmpv::Value::from(u)
                } else {
                    rmpv::Value::F64(n.as_f64().unwrap_or(f64::NAN))
                }
            }
            Value::String(s) => rmpv::Value::from(s.as_str()),
            Value::Array(a) => rmpv::Value::Array(a.iter().map(convert).collect()),
            Value::Object(o) => rmpv::Value::Map(
                o.iter()
                    .map(|(k, v)| (rmpv::Value::from(k.as_str()), convert(v)))
                    .collect(),
            ),
        }
    }
    let mut out = Vec::new();
    // Writing to a Vec cannot fail.
    let _ = rmpv::encode::write_value(&mut out, &convert(v));
    out
}
