//! A MessagePack walker that finds where each element of a body ends and
//! checks its shape *without* building it, so a hostile body (millions of
//! elements, a map of a million keys, deep nesting) costs no memory before it
//! is refused. Only elements that pass are decoded with `rmpv`.

/// What a body starts with.
pub(super) enum Header {
    /// An array of this many elements (its header is consumed).
    Array(usize),
    /// One map (nothing consumed: the map is the only element).
    Map,
    /// Something else, named for the error message.
    Other(&'static str),
}

/// A cursor over a MessagePack body.
pub(super) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

/// True for the first byte of a MessagePack map or array.
pub(super) fn is_container(b: u8) -> bool {
    matches!(b, 0x80..=0x9f | 0xdc..=0xdf)
}

impl<'a> Reader<'a> {
    pub(super) fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    /// The bytes not read yet.
    pub(super) fn rest(&self) -> &'a [u8] {
        &self.buf[self.pos..]
    }

    pub(super) fn container_header(&mut self) -> Result<Header, String> {
        let Some(&b) = self.buf.first() else {
            return Err("the body is empty".into());
        };
        Ok(match b {
            0x80..=0x8f | 0xde | 0xdf => Header::Map,
            0x90..=0x9f | 0xdc | 0xdd => {
                let n = self.header()?;
                Header::Array(usize::try_from(n).unwrap_or(usize::MAX))
            }
            0xc0 => Header::Other("nil"),
            0xc2 | 0xc3 => Header::Other("a boolean"),
            0xca | 0xcb => Header::Other("a float"),
            0xa0..=0xbf | 0xd9..=0xdb => Header::Other("a string"),
            0xc4..=0xc6 => Header::Other("binary data"),
            0xc7..=0xc9 | 0xd4..=0xd8 => Header::Other("an extension value"),
            0xc1 => return Err("byte 0xc1 is never used in MessagePack".into()),
            _ => Header::Other("an integer"),
        })
    }

    /// Reads one whole element; returns its bytes and whether its shape is an
    /// event's (at most `max_values` entries/elements, nested at most `max_depth`).
    pub(super) fn element(
        &mut self,
        max_values: usize,
        max_depth: usize,
    ) -> Result<(&'a [u8], bool), String> {
        let start = self.pos;
        let mut shape_ok = true;
        let mut values: u64 = 0;
        // Values still to read in each open container, while the shape holds.
        let mut open: Vec<u64> = Vec::new();
        // Values still to read once the shape failed (then only the end matters).
        let mut pending: u64 = 0;
        loop {
            let Value { entries, children } = self.value()?;
            if !shape_ok {
                pending = pending - 1 + children;
                if pending == 0 {
                    break;
                }
                continue;
            }
            if let Some(top) = open.last_mut() {
                *top -= 1;
            }
            if children > 0 {
                values += entries;
                open.push(children);
                if open.len() > max_depth || values > max_values as u64 {
                    shape_ok = false;
                    pending = open.iter().sum();
                    continue;
                }
            }
            while open.last() == Some(&0) {
                open.pop();
            }
            if open.is_empty() {
                break;
            }
        }
        Ok((&self.buf[start..self.pos], shape_ok))
    }

    /// Reads an array header; returns its element count.
    fn header(&mut self) -> Result<u64, String> {
        let at = self.pos;
        let v = self.value()?;
        if v.children == v.entries {
            Ok(v.entries)
        } else {
            Err(format!("expected an array at byte {at}"))
        }
    }

    /// Reads one value's marker and skips its payload, except a container's
    /// contents, which are the next values.
    fn value(&mut self) -> Result<Value, String> {
        let at = self.pos;
        let b = self.byte()?;
        let (len_bytes, skip_extra, kind) = match b {
            0x00..=0x7f | 0xc0 | 0xc2 | 0xc3 | 0xe0..=0xff => return Ok(Value::scalar()),
            0x80..=0x8f => return Ok(Value::map(u64::from(b & 0x0f))),
            0x90..=0x9f => return Ok(Value::array(u64::from(b & 0x0f))),
            0xa0..=0xbf => {
                self.skip(u64::from(b & 0x1f))?;
                return Ok(Value::scalar());
            }
            0xc1 => return Err(format!("byte 0xc1 at {at} is never used in MessagePack")),
            0xc4 | 0xd9 => (1, 0, Kind::Bytes),
            0xc5 | 0xda => (2, 0, Kind::Bytes),
            0xc6 | 0xdb => (4, 0, Kind::Bytes),
            0xc7 => (1, 1, Kind::Bytes),
            0xc8 => (2, 1, Kind::Bytes),
            0xc9 => (4, 1, Kind::Bytes),
            0xca => (0, 4, Kind::Bytes),
            0xcb => (0, 8, Kind::Bytes),
            0xcc | 0xd0 => (0, 1, Kind::Bytes),
            0xcd | 0xd1 => (0, 2, Kind::Bytes),
            0xce | 0xd2 => (0, 4, Kind::Bytes),
            0xcf | 0xd3 => (0, 8, Kind::Bytes),
            0xd4 => (0, 2, Kind::Bytes),
            0xd5 => (0, 3, Kind::Bytes),
            0xd6 => (0, 5, Kind::Bytes),
            0xd7 => (0, 9, Kind::Bytes),
            0xd8 => (0, 17, Kind::Bytes),
            0xdc => (2, 0, Kind::Array),
            0xdd => (4, 0, Kind::Array),
            0xde => (2, 0, Kind::Map),
            0xdf => (4, 0, Kind::Map),
        };
        let len = if len_bytes > 0 {
            self.uint(len_bytes)?
        } else {
            0
        };
        Ok(match kind {
            Kind::Bytes => {
                self.skip(len + skip_extra)?;
                Value::scalar()
            }
            Kind::Array => Value::array(len),
            Kind::Map => Value::map(len),
        })
    }

    fn byte(&mut self) -> Result<u8, String> {
        let b = *self
            .buf
            .get(self.pos)
            .ok_or_else(|| format!("the body ends inside a value (at byte {})", self.pos))?;
        self.pos += 1;
        Ok(b)
    }

    fn uint(&mut self, bytes: usize) -> Result<u64, String> {
        let mut n: u64 = 0;
        for _ in 0..bytes {
            n = (n << 8) | u64::from(self.byte()?);
        }
        Ok(n)
    }

    fn skip(&mut self, len: u64) -> Result<(), String> {
        let left = (self.buf.len() - self.pos) as u64;
        if len > left {
            return Err(format!(
                "a value at byte {} claims {len} bytes but only {left} follow",
                self.pos
            ));
        }
        self.pos += len as usize;
        Ok(())
    }
}

enum Kind {
    Bytes,
    Array,
    Map,
}

/// A value's size as a container: `entries` (array elements or map pairs)
/// and `children` (values that follow: elements, or keys and values).
struct Value {
    entries: u64,
    children: u64,
}

impl Value {
    fn scalar() -> Self {
        Self {
            entries: 0,
            children: 0,
        }
    }
    fn array(n: u64) -> Self {
        Self {
            entries: n,
            children: n,
        }
    }
    fn map(n: u64) -> Self {
        Self {
            entries: n,
            children: 2 * n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(v: &rmpv::Value) -> Vec<u8> {
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, v).expect("encode");
        out
    }

    #[test]
    fn elements_end_where_rmpv_says() {
        use rmpv::Value as V;
        let items = vec![
            V::Map(vec![
                (V::from("id"), V::from("a")),
                (V::from("n"), V::from(-5)),
                (V::from("f"), V::F32(0.5)),
                (V::from("d"), V::F64(1e300)),
                (V::from("b"), V::Binary(vec![1; 300])),
                (V::from("big"), V::from(u64::MAX)),
                (V::from("s"), V::from("x".repeat(70_000))),
                (V::from("e"), V::Ext(3, vec![0; 20])),
                (
                    V::from("m"),
                    V::Map(vec![(
                        V::from("k"),
                        V::Array(vec![V::Nil, V::Boolean(true)]),
                    )]),
                ),
            ]),
            V::Nil,
            V::Map(vec![]),
        ];
        let body = encode(&V::Array(items.clone()));
        let mut r = Reader::new(&body);
        let Ok(Header::Array(3)) = r.container_header() else {
            panic!("array header");
        };
        for item in &items {
            let (raw, ok) = r.element(128, 4).expect("element");
            assert!(ok);
            assert_eq!(raw, encode(item).as_slice());
        }
        assert!(r.rest().is_empty());
    }

    #[test]
    fn a_wide_or_deep_item_is_skipped_whole_and_flagged() {
        use rmpv::Value as V;
        let wide = V::Map(
            (0..1000)
                .map(|i| (V::from(format!("k{i}")), V::Nil))
                .collect(),
        );
        let mut deep = V::Nil;
        for _ in 0..100 {
            deep = V::Array(vec![deep, V::from(1)]);
        }
        let body = encode(&V::Array(vec![
            wide.clone(),
            deep.clone(),
            V::from("after"),
        ]));
        let mut r = Reader::new(&body);
        let Ok(Header::Array(3)) = r.container_header() else {
            panic!("array header");
        };
        let (raw, ok) = r.element(128, 4).expect("wide");
        assert!(!ok);
        assert_eq!(raw, encode(&wide).as_slice());
        let (raw, ok) = r.element(128, 4).expect("deep");
        assert!(!ok);
        assert_eq!(raw, encode(&deep).as_slice());
        let (raw, ok) = r.element(128, 4).expect("after");
        assert!(ok);
        assert_eq!(raw, encode(&V::from("after")).as_slice());
    }

    #[test]
    fn truncated_and_lying_lengths_are_errors_not_allocations() {
        // An array claiming 2^32-1 elements with none present.
        let body = [0xdd, 0xff, 0xff, 0xff, 0xff];
        let mut r = Reader::new(&body);
        let Ok(Header::Array(n)) = r.container_header() else {
            panic!("array header");
        };
        assert_eq!(n, u32::MAX as usize);
        assert!(r.element(128, 4).is_err());
        // A string claiming 4 GiB.
        let body = [0xdb, 0xff, 0xff, 0xff, 0xff, b'a'];
        assert!(Reader::new(&body).element(128, 4).is_err());
        assert!(Reader::new(&[0xc1]).element(128, 4).is_err());
    }
}
