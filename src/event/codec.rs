//! Wire codecs: a request or message body → a list of items, each with its raw bytes.
//!
//! Decoding is split from validation so that one bad element of a batch is
//! rejected on its own (with its raw bytes kept) while its neighbours go on.
//! Only a body that cannot be split into items at all fails as a whole.

use std::borrow::Cow;

use serde_json::{Map, Number, Value};

mod msgpack;

use super::cost::format_nanos_short;
use super::validate::{self, describe, Fields, ValidationError, ValidationRules};
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
    /// The encoding named by a `Content-Type` header; sniffed from the body
    /// when absent or generic.
    ///
    /// Only what can be told from the bytes is sniffed: a text type
    /// (`text/plain`, form encoding) can hold JSON or NDJSON, never
    /// MessagePack; no type or `application/octet-stream` can hold either.
    /// Anything else is [`CodecError::Unrecognised`] (HTTP 415).
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
            None | Some("application/octet-stream") => Self::sniff(body, true)
                .ok_or_else(|| CodecError::unrecognised(essence.as_deref(), body)),
            // curl's `-d` default and generic text types: JSON or NDJSON only.
            Some("application/x-www-form-urlencoded") | Some("text/plain") => {
                Self::sniff(body, false)
                    .ok_or_else(|| CodecError::unrecognised(essence.as_deref(), body))
            }
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
            Some(other) => Err(CodecError::UnsupportedMediaType(validate::truncate_chars(
                &crate::event::escape_controls(other),
                64,
            ))),
        }
    }

    /// JSON bodies start with `{` or `[` (after a byte-order mark and
    /// whitespace); MessagePack maps and arrays start with their own markers.
    fn sniff(body: &[u8], msgpack: bool) -> Option<Self> {
        let text = strip_bom(body);
        let first = text.iter().find(|b| !b.is_ascii_whitespace());
        match first {
            Some(b'[') => Some(Self::Json),
            Some(b'{') => {
                // Several top-level objects: NDJSON.
                let mut stream =
                    serde_json::Deserializer::from_slice(text).into_iter::<serde::de::IgnoredAny>();
                let _ = stream.next();
                match stream.next() {
                    Some(_) => Some(Self::Ndjson),
                    None => Some(Self::Json),
                }
            }
            _ if msgpack && body.first().is_some_and(|&b| msgpack::is_container(b)) => {
                Some(Self::MsgPack)
            }
            _ => None,
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
    /// No or a generic `Content-Type`, and the bytes are none of the encodings
    /// that type can hold.
    #[error("{0}")]
    Unrecognised(String),
    /// The bytes are not valid in the encoding.
    #[error("{0}")]
    Unparseable(String),
    /// The body decoded to zero events.
    #[error("the body holds no events; send one event object or a non-empty array of them")]
    Empty,
    /// More events than one body may carry (counted before decoding them).
    #[error(
        "the body holds more than {max} events; at most {max} are accepted per request, split the batch"
    )]
    TooManyEvents {
        /// The configured limit.
        max: usize,
    },
}

impl CodecError {
    fn unrecognised(declared: Option<&str>, body: &[u8]) -> Self {
        let what = match declared {
            None => "no Content-Type was given".to_string(),
            Some(t) => format!("Content-Type `{t}` was given"),
        };
        let could = if declared.is_some_and(|t| t != "application/octet-stream") {
            "text can be JSON or NDJSON"
        } else {
            "the body can be JSON, NDJSON or MessagePack"
        };
        let first = match body.first() {
            Some(b) => format!("it starts with byte 0x{b:02x}"),
            None => "it is empty".to_string(),
        };
        Self::Unrecognised(format!(
            "cannot tell the body's encoding: {what}, {could}, and {first}; set Content-Type to one of {}",
            SUPPORTED_CONTENT_TYPES.join(", ")
        ))
    }
}

/// A UTF-8 byte-order mark some editors and SDKs put before JSON.
fn strip_bom(body: &[u8]) -> &[u8] {
    body.strip_prefix(b"\xEF\xBB\xBF".as_slice())
        .unwrap_or(body)
}

/// One element of a body: its raw bytes, and its decoded fields or why it failed.
#[derive(Debug)]
pub struct Item<'a> {
    /// The element's bytes as received.
    pub raw: Cow<'a, [u8]>,
    /// The event's fields (CloudEvents already unwrapped), or the item-level error.
    pub value: Result<Decoded<'a>, ValidationError>,
}

/// An item's fields, read one of two ways with the same meaning.
// `Fields` is ~640 bytes in place; boxing it would cost the allocation per
// event that reading in place saves. Items live only while a body is read.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Decoded<'a> {
    /// A plain JSON object of known fields, read without building a map
    /// (most events): [`validate::validate_fields`].
    Fields(Fields<'a>),
    /// Anything else, as a JSON value: [`validate::validate`].
    Value(Value),
}

impl Decoded<'_> {
    /// Validates and normalises the item.
    pub fn validate(&self, rules: &ValidationRules) -> Result<Event, ValidationError> {
        match self {
            Decoded::Fields(f) => validate::validate_fields(f, rules),
            Decoded::Value(v) => validate::validate(v, rules),
        }
    }

    /// The item's `id` when it is a string.
    pub fn id(&self) -> Option<&str> {
        match self {
            Decoded::Fields(f) => f.id(),
            Decoded::Value(v) => v.get("id").and_then(Value::as_str),
        }
    }
}

/// Splits a body into items. `max_events` bounds the work done on hostile input.
pub fn decode_body(
    body: &[u8],
    encoding: Encoding,
    max_events: usize,
) -> Result<Vec<Item<'_>>, CodecError> {
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

fn decode_json(body: &[u8], encoding: Encoding, max: usize) -> Result<Vec<Item<'_>>, CodecError> {
    use serde_json::value::RawValue;
    let body = strip_bom(body);
    let invalid = |e: serde_json::Error| CodecError::Unparseable(format!("invalid JSON: {e}"));
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    let raws: Vec<&RawValue> = match first {
        Some(b'[') => bounded_array(body, max)?,
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
    let cloud = matches!(encoding, Encoding::CloudEvents | Encoding::CloudEventsBatch);
    Ok(raws
        .into_iter()
        .map(|raw| {
            let raw = raw.get().as_bytes();
            Item {
                raw: Cow::Borrowed(raw),
                value: json_item(raw, "invalid JSON", cloud),
            }
        })
        .collect())
}

/// The elements of a JSON array, refusing the body as soon as it holds more
/// than `max` (so a body of millions of `0`s is never collected).
fn bounded_array(body: &[u8], max: usize) -> Result<Vec<&serde_json::value::RawValue>, CodecError> {
    use serde::de::{Deserializer as _, Error as _, SeqAccess, Visitor};
    use serde_json::value::RawValue;
    const TOO_MANY: &str = "tally: too many elements";
    struct Elements(usize);
    impl<'de> Visitor<'de> for Elements {
        type Value = Vec<&'de RawValue>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an array of events")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(raw) = seq.next_element::<&'de RawValue>()? {
                if out.len() == self.0 {
                    return Err(A::Error::custom(TOO_MANY));
                }
                out.push(raw);
            }
            Ok(out)
        }
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let parsed = de
        .deserialize_seq(Elements(max))
        .and_then(|v| de.end().map(|()| v));
    parsed.map_err(|e| {
        if e.to_string().starts_with(TOO_MANY) {
            CodecError::TooManyEvents { max }
        } else {
            CodecError::Unparseable(format!("invalid JSON: {e}"))
        }
    })
}

fn decode_ndjson(body: &[u8], max: usize) -> Result<Vec<Item<'_>>, CodecError> {
    let mut items = Vec::new();
    for line in strip_bom(body)
        .split(|b| *b == b'\n')
        .map(|l| l.trim_ascii())
        .filter(|l| !l.is_empty())
    {
        if items.len() == max {
            return Err(CodecError::TooManyEvents { max });
        }
        items.push(Item {
            raw: Cow::Borrowed(line),
            value: json_item(line, "invalid JSON on this line", false),
        });
    }
    Ok(items)
}

/// One JSON item, refused before it is built when its shape is not an event's
/// (see [`MAX_ITEM_VALUES`], [`MAX_ITEM_DEPTH`]). A plain object of known
/// fields is read in place ([`Fields::parse`]); anything else (a CloudEvent,
/// an unknown field, an error to report) as a [`Value`]. `cloud`: the body
/// was declared CloudEvents, so every item must be one.
fn json_item<'a>(
    raw: &'a [u8],
    invalid: &str,
    cloud: bool,
) -> Result<Decoded<'a>, ValidationError> {
    json_shape(raw).map_err(|m| ValidationError::single(None, m))?;
    if !cloud {
        if let Some(fields) = Fields::parse(raw) {
            return Ok(Decoded::Fields(fields));
        }
    }
    serde_json::from_slice::<Value>(raw)
        .map_err(|e| ValidationError::single(None, format!("{invalid}: {e}")))
        .and_then(|v| unwrap_cloudevent(v, cloud))
        .map(Decoded::Value)
}

/// Most values (map entries and array elements, at any depth) in one item.
/// An event has 20 fields and at most 16 metadata entries.
pub const MAX_ITEM_VALUES: usize = 128;
/// Deepest nesting of objects/arrays in one item (a CloudEvent's `data.metadata` is 3).
pub const MAX_ITEM_DEPTH: usize = 4;

fn shape_error() -> String {
    format!(
        "the item is not shaped like an event: more than {MAX_ITEM_VALUES} values or objects nested deeper than {MAX_ITEM_DEPTH}; an event is one object of at most 20 fields and 16 metadata entries"
    )
}

/// Checks an item's shape on its bytes, without building it: counts the
/// separators and brackets outside strings.
fn json_shape(raw: &[u8]) -> Result<(), String> {
    let (mut in_string, mut escaped) = (false, false);
    let (mut depth, mut values) = (0usize, 0usize);
    for &b in raw {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                values += 1;
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            b',' => values += 1,
            _ => {}
        }
        if depth > MAX_ITEM_DEPTH || values > MAX_ITEM_VALUES {
            return Err(shape_error());
        }
    }
    Ok(())
}

fn decode_msgpack(body: &[u8], max: usize) -> Result<Vec<Item<'_>>, CodecError> {
    let invalid = |e: String| CodecError::Unparseable(format!("invalid MessagePack: {e}"));
    let mut reader = msgpack::Reader::new(body);
    // The count is read from the array header, before any element is decoded.
    let count = match reader.container_header().map_err(invalid)? {
        msgpack::Header::Array(n) => n,
        msgpack::Header::Map => 1,
        msgpack::Header::Other(kind) => {
            return Err(CodecError::Unparseable(format!(
                "the MessagePack body must be a map or an array of maps, got {kind}"
            )))
        }
    };
    if count > max {
        return Err(CodecError::TooManyEvents { max });
    }
    let mut items = Vec::with_capacity(count);
    for _ in 0..count {
        let (raw, shape_ok) = reader
            .element(MAX_ITEM_VALUES, MAX_ITEM_DEPTH)
            .map_err(invalid)?;
        let value = if shape_ok {
            decode_msgpack_item(raw).map(Decoded::Value)
        } else {
            Err(ValidationError::single(None, shape_error()))
        };
        items.push(Item {
            raw: Cow::Borrowed(raw),
            value,
        });
    }
    if !reader.rest().is_empty() {
        return Err(invalid(format!(
            "{} trailing bytes after the first value",
            reader.rest().len()
        )));
    }
    Ok(items)
}

/// One MessagePack item whose shape was checked already (so it is small).
fn decode_msgpack_item(mut raw: &[u8]) -> Result<Value, ValidationError> {
    let v = rmpv::decode::read_value_with_max_depth(&mut raw, 4 * MAX_ITEM_DEPTH + 4)
        .map_err(|e| ValidationError::single(None, format!("invalid MessagePack: {e}")))?;
    msgpack_to_json(v)
        .map_err(|(path, m)| {
            let at = if path.is_empty() {
                String::new()
            } else {
                format!("field `{}`: ", validate::quoted_name(&path.join(".")))
            };
            ValidationError::single(None, format!("{at}{m}"))
        })
        .and_then(|v| unwrap_cloudevent(v, false))
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
///
/// An error carries the path to the offending value, innermost key last,
/// built only when there is an error.
fn msgpack_to_json(v: rmpv::Value) -> Result<Value, (Vec<String>, String)> {
    let fail = |m: &str| Err((Vec::new(), m.to_string()));
    Ok(match v {
        rmpv::Value::Nil => Value::Null,
        rmpv::Value::Boolean(b) => Value::Bool(b),
        rmpv::Value::Integer(i) => match (i.as_i64(), i.as_u64()) {
            (Some(n), _) => Value::Number(n.into()),
            (None, Some(n)) => Value::Number(n.into()),
            _ => return fail("integer out of range"),
        },
        // An f32's shortest decimal is what its sender wrote (`0.0023`), where
        // widening to f64 first would give 0.002300000051036477.
        rmpv::Value::F32(f) => match f.is_finite().then(|| f.to_string()) {
            Some(text) => serde_json::from_str::<Number>(&text)
                .map(Value::Number)
                .or_else(|_| fail("not a finite number"))?,
            None => return fail("not a finite number"),
        },
        rmpv::Value::F64(f) => match float(f) {
            Some(v) => v,
            None => return fail("not a finite number"),
        },
        rmpv::Value::String(s) => match s.into_str() {
            Some(s) => Value::String(s),
            None => return fail("string is not valid UTF-8"),
        },
        rmpv::Value::Array(a) => Value::Array(
            a.into_iter()
                .map(msgpack_to_json)
                .collect::<Result<_, _>>()?,
        ),
        rmpv::Value::Map(entries) => {
            let mut map = Map::new();
            for (k, val) in entries {
                let rmpv::Value::String(k) = k else {
                    return fail(&format!(
                        "map keys must be strings, got {}",
                        msgpack_kind(&k)
                    ));
                };
                let Some(k) = k.into_str() else {
                    return fail("map key is not valid UTF-8");
                };
                match msgpack_to_json(val) {
                    Ok(val) => {
                        map.insert(k, val);
                    }
                    Err((mut path, m)) => {
                        path.insert(0, k);
                        return Err((path, m));
                    }
                }
            }
            Value::Object(map)
        }
        rmpv::Value::Binary(_) => return fail("binary values are not accepted; send a string"),
        rmpv::Value::Ext(..) => return fail("MessagePack extension types are not accepted"),
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
