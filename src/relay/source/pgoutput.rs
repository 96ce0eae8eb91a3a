//! Decoding of the pgoutput messages the relay needs (Relation, Insert) into outbox events (pure, no I/O).

use std::collections::HashMap;

use uuid::Uuid;

use super::super::envelope::OutboxEvent;

/// A malformed or unexpected pgoutput message.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    #[error("pgoutput message truncated")]
    Truncated,
    #[error("pgoutput: {0}")]
    Invalid(String),
}

/// What a pgoutput message means to the relay.
#[derive(Debug, PartialEq)]
pub enum Decoded {
    /// A relation (table) description was recorded.
    Relation,
    /// A row inserted into the outbox table.
    Insert(OutboxEvent),
    /// Anything else (other tables, updates, deletes, truncates, types, origins).
    Ignored,
}

/// Column positions of the outbox columns in a relation.
#[derive(Debug, Clone, Default)]
struct OutboxColumns {
    id: Option<usize>,
    aggregatetype: Option<usize>,
    aggregateid: Option<usize>,
    event_type: Option<usize>,
    payload: Option<usize>,
    headers: Option<usize>,
}

/// Keeps the relation map of one replication session and decodes messages.
#[derive(Debug)]
pub struct Decoder {
    schema: String,
    table: String,
    /// Relation id → outbox column positions (only for the outbox table).
    outbox: HashMap<u32, OutboxColumns>,
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn u8(&mut self) -> Result<u8, DecodeError> {
        let (&b, rest) = self.0.split_first().ok_or(DecodeError::Truncated)?;
        self.0 = rest;
        Ok(b)
    }
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(
            self.bytes(2)?
                .try_into()
                .map_err(|_| DecodeError::Truncated)?,
        ))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(
            self.bytes(4)?
                .try_into()
                .map_err(|_| DecodeError::Truncated)?,
        ))
    }
    fn cstr(&mut self) -> Result<&'a str, DecodeError> {
        let end = self
            .0
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError::Truncated)?;
        let s = std::str::from_utf8(&self.0[..end])
            .map_err(|_| DecodeError::Invalid("identifier is not UTF-8".into()))?;
        self.0 = &self.0[end + 1..];
        Ok(s)
    }
}

impl Decoder {
    pub fn new(schema: &str, table: &str) -> Self {
        Self {
            schema: schema.to_owned(),
            table: table.to_owned(),
            outbox: HashMap::new(),
        }
    }

    /// Decodes one pgoutput message (the payload of an XLogData that is not Begin/Commit).
    /// `commit_time` is the enclosing transaction's commit time.
    pub fn decode(
        &mut self,
        data: &[u8],
        commit_time: Option<std::time::SystemTime>,
    ) -> Result<Decoded, DecodeError> {
        let mut r = Reader(data);
        match r.u8()? {
            b'R' => {
                let relid = r.u32()?;
                let namespace = r.cstr()?;
                let name = r.cstr()?;
                if namespace != self.schema || name != self.table {
                    self.outbox.remove(&relid);
                    return Ok(Decoded::Relation);
                }
                let _replident = r.u8()?;
                let ncols = r.u16()? as usize;
                let mut cols = OutboxColumns::default();
                for i in 0..ncols {
                    let _flags = r.u8()?;
                    let col = r.cstr()?;
                    let _type_oid = r.u32()?;
                    let _typmod = r.u32()?;
                    match col {
                        "id" => cols.id = Some(i),
                        "aggregatetype" => cols.aggregatetype = Some(i),
                        "aggregateid" => cols.aggregateid = Some(i),
                        "type" => cols.event_type = Some(i),
                        "payload" => cols.payload = Some(i),
                        "headers" => cols.headers = Some(i),
                        _ => {}
                    }
                }
                self.outbox.insert(relid, cols);
                Ok(Decoded::Relation)
            }
            b'I' => {
                let relid = r.u32()?;
                let Some(cols) = self.outbox.get(&relid) else {
                    return Ok(Decoded::Ignored);
                };
                if r.u8()? != b'N' {
                    return Err(DecodeError::Invalid("insert without a new tuple".into()));
                }
                let values = tuple(&mut r)?;
                let text =
                    |idx: Option<usize>, name: &str| -> Result<Option<String>, DecodeError> {
                        match idx {
                            None => Ok(None),
                            Some(i) => match values.get(i) {
                                Some(Some(v)) => {
                                    String::from_utf8(v.to_vec()).map(Some).map_err(|_| {
                                        DecodeError::Invalid(format!("column {name} is not UTF-8"))
                                    })
                                }
                                Some(None) => Ok(None),
                                None => Err(DecodeError::Invalid(format!(
                                    "column {name} missing in tuple"
                                ))),
                            },
                        }
                    };
                let required = |idx, name: &str| -> Result<String, DecodeError> {
                    text(idx, name)?.ok_or_else(|| {
                        DecodeError::Invalid(format!("outbox column {name} is NULL or missing"))
                    })
                };
                let id = required(cols.id, "id")?;
                let id = Uuid::parse_str(&id)
                    .map_err(|_| DecodeError::Invalid(format!("id {id:?} is not a uuid")))?;
                Ok(Decoded::Insert(OutboxEvent {
                    id,
                    aggregatetype: required(cols.aggregatetype, "aggregatetype")?,
                    aggregateid: required(cols.aggregateid, "aggregateid")?,
                    event_type: required(cols.event_type, "type")?,
                    payload: text(cols.payload, "payload")?,
                    headers: text(cols.headers, "headers")?,
                    created_at: commit_time,
                }))
            }
            _ => Ok(Decoded::Ignored),
        }
    }
}

/// TupleData: per column `n` (NULL), `u` (unchanged TOAST), `t`/`b` + length + bytes.
fn tuple<'a>(r: &mut Reader<'a>) -> Result<Vec<Option<&'a [u8]>>, DecodeError> {
    let n = r.u16()? as usize;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        match r.u8()? {
            b'n' | b'u' => out.push(None),
            b't' | b'b' => {
                let len = r.u32()? as usize;
                out.push(Some(r.bytes(len)?));
            }
            other => {
                return Err(DecodeError::Invalid(format!(
                    "unknown tuple column kind {other}"
                )));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn relation(relid: u32, schema: &str, table: &str, cols: &[&str]) -> Vec<u8> {
        let mut v = vec![b'R'];
        v.extend(relid.to_be_bytes());
        v.extend(schema.as_bytes());
        v.push(0);
        v.extend(table.as_bytes());
        v.push(0);
        v.push(b'd');
        v.extend((cols.len() as u16).to_be_bytes());
        for c in cols {
            v.push(0);
            v.extend(c.as_bytes());
            v.push(0);
            v.extend(25u32.to_be_bytes());
            v.extend((-1i32).to_be_bytes());
        }
        v
    }

    pub(crate) fn insert(relid: u32, values: &[Option<&str>]) -> Vec<u8> {
        let mut v = vec![b'I'];
        v.extend(relid.to_be_bytes());
        v.push(b'N');
        v.extend((values.len() as u16).to_be_bytes());
        for val in values {
            match val {
                None => v.push(b'n'),
                Some(s) => {
                    v.push(b't');
                    v.extend((s.len() as u32).to_be_bytes());
                    v.extend(s.as_bytes());
                }
            }
        }
        v
    }

    const COLS: &[&str] = &[
        "id",
        "aggregatetype",
        "aggregateid",
        "type",
        "payload",
        "headers",
        "created_at",
        "seq",
    ];

    #[test]
    fn inserts_into_the_outbox_decode_into_events() {
        let mut d = Decoder::new("public", "outbox");
        assert_eq!(
            d.decode(&relation(7, "public", "outbox", COLS), None)
                .unwrap(),
            Decoded::Relation
        );
        let id = "8d6f1b5e-3c1a-4f3e-9d51-4f0e7a5b2c11";
        let msg = insert(
            7,
            &[
                Some(id),
                Some("order"),
                Some("42"),
                Some("created"),
                Some("{\"a\": 1}"),
                None,
                Some("2024-01-01"),
                Some("1"),
            ],
        );
        let Decoded::Insert(ev) = d.decode(&msg, None).unwrap() else {
            panic!("not an insert")
        };
        assert_eq!(ev.id.to_string(), id);
        assert_eq!(ev.aggregateid, "42");
        assert_eq!(ev.event_type, "created");
        assert_eq!(ev.payload.as_deref(), Some("{\"a\": 1}"));
        assert_eq!(ev.headers, None);
    }

    #[test]
    fn other_tables_and_other_operations_are_ignored() {
        let mut d = Decoder::new("public", "outbox");
        d.decode(&relation(8, "public", "orders", &["id"]), None)
            .unwrap();
        assert_eq!(
            d.decode(&insert(8, &[Some("1")]), None).unwrap(),
            Decoded::Ignored
        );
        assert_eq!(d.decode(b"D\0\0\0\x07", None).unwrap(), Decoded::Ignored);
        assert_eq!(d.decode(b"T", None).unwrap(), Decoded::Ignored);
    }

    #[test]
    fn truncated_and_malformed_messages_are_errors_not_panics() {
        let mut d = Decoder::new("public", "outbox");
        d.decode(&relation(7, "public", "outbox", COLS), None)
            .unwrap();
        let full = insert(
            7,
            &[
                Some("not-a-uuid"),
                Some("a"),
                Some("b"),
                Some("c"),
                None,
                None,
                None,
                None,
            ],
        );
        assert!(matches!(
            d.decode(&full, None),
            Err(DecodeError::Invalid(_))
        ));
        for cut in 1..full.len() {
            assert!(d.decode(&full[..cut], None).is_err(), "cut at {cut}");
        }
        let rel = relation(7, "public", "outbox", COLS);
        for cut in 1..rel.len() {
            let _ = Decoder::new("public", "outbox").decode(&rel[..cut], None);
        }
    }
}
