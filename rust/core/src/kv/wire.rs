//! The KV service's `Batch` RPC on the wire (`proto/dengine/v1/kv.proto`), for the leader's fast
//! path: a batch of session writes goes from request bytes to log payloads, and their results
//! from result bytes to response bytes, without a protobuf object per operation.
//!
//! Only the canonical, unambiguous form is taken: every field at most once, no unknown fields,
//! one operation per `Operation`, valid keys, values and sessions. Anything else makes
//! [`parse_session_writes`] answer `None`, and the caller takes the general path (the protobuf
//! library, field-by-field checks, per-operation error messages), so both paths always agree.

use super::command::{encode, Command, OP_CAS, OP_DELETE, OP_PUT, OP_PUT_PREV};
use super::{FORMAT_VERSION, MAX_KEY_SIZE, MAX_VALUE_SIZE};
use crate::sessions::SESSION_HEADER_LEN;

const SESSION_KIND: u8 = 2;
const WIRE_VARINT: u8 = 0;
const WIRE_LEN: u8 = 2;

/// One write of a batch, ready to propose: its op code, session and log payload (the session
/// envelope followed by the KV command).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionWrite {
    /// `OP_PUT`, `OP_DELETE` or `OP_CAS`: which response answers it.
    pub op: u8,
    /// The client's id (never 0).
    pub client: u64,
    /// The write's sequence number (never 0).
    pub sequence: u64,
    /// The envelope and command, as the log stores them.
    pub payload: Vec<u8>,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    fn done(&self) -> bool {
        self.pos >= self.buf.len()
    }

    fn varint(&mut self) -> Option<u64> {
        let mut value = 0u64;
        for i in 0..10 {
            let byte = *self.buf.get(self.pos)?;
            self.pos += 1;
            if i == 9 && byte > 1 {
                return None; // more than 64 bits
            }
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }

    /// The next field's number and wire type.
    fn tag(&mut self) -> Option<(u64, u8)> {
        let key = self.varint()?;
        Some((key >> 3, (key & 7) as u8))
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = usize::try_from(self.varint()?).ok()?;
        let end = self.pos.checked_add(len)?;
        let out = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(out)
    }
}

/// How many times field `number` occurs at the top level of the protobuf message `buf`, counted
/// only as far as `limit + 1`: enough to refuse a message with too many repeated items (a
/// batch of millions of empty operations) before a protobuf library builds an object for each.
/// `None` for bytes that are not a well-formed message at the top level.
pub fn count_field(buf: &[u8], number: u64, limit: usize) -> Option<usize> {
    const WIRE_FIXED64: u8 = 1;
    const WIRE_FIXED32: u8 = 5;
    let mut r = Reader::new(buf);
    let mut count = 0;
    while !r.done() && count <= limit {
        let (field, wire) = r.tag()?;
        match wire {
            WIRE_VARINT => {
                r.varint()?;
            }
            WIRE_LEN => {
                r.bytes()?;
            }
            WIRE_FIXED64 | WIRE_FIXED32 => {
                let width = if wire == WIRE_FIXED64 { 8 } else { 4 };
                r.pos = r.pos.checked_add(width).filter(|&end| end <= r.buf.len())?;
            }
            _ => return None,
        }
        count += usize::from(field == number);
    }
    Some(count)
}

/// Reads a message whose fields are all known: `field(number, wire type, reader)` consumes each
/// one and says whether it was acceptable; a field seen twice is not.
fn fields<'a>(buf: &'a [u8], mut field: impl FnMut(u64, u8, &mut Reader<'a>) -> Option<()>) -> Option<()> {
    let mut r = Reader::new(buf);
    let mut seen = 0u64;
    while !r.done() {
        let (number, wire) = r.tag()?;
        if !(1..64).contains(&number) || seen & (1 << number) != 0 {
            return None;
        }
        seen |= 1 << number;
        field(number, wire, &mut r)?;
    }
    Some(())
}

fn len_field<'a>(wire: u8, r: &mut Reader<'a>) -> Option<&'a [u8]> {
    (wire == WIRE_LEN).then_some(())?;
    r.bytes()
}

fn varint_field(wire: u8, r: &mut Reader<'_>) -> Option<u64> {
    (wire == WIRE_VARINT).then_some(())?;
    r.varint()
}

fn bool_field(wire: u8, r: &mut Reader<'_>) -> Option<bool> {
    match varint_field(wire, r)? {
        0 => Some(false),
        1 => Some(true),
        _ => None,
    }
}

#[derive(Default)]
struct Session {
    client: u64,
    sequence: u64,
    first_outstanding: u64,
}

fn session(buf: &[u8]) -> Option<Session> {
    let mut s = Session::default();
    fields(buf, |number, wire, r| {
        let v = varint_field(wire, r)?;
        match number {
            1 => s.client = v,
            2 => s.sequence = v,
            3 => s.first_outstanding = v,
            _ => return None,
        }
        Some(())
    })?;
    Some(s)
}

/// One request's fields: `key`, `value`, `expected`, `has_expected`, `session`, `prev_kv`, by
/// their field numbers in the given request type.
#[derive(Default)]
struct Request<'a> {
    key: &'a [u8],
    value: &'a [u8],
    expected: &'a [u8],
    has_expected: bool,
    session: Option<Session>,
    prev_kv: bool,
}

fn request(op: u8, buf: &[u8]) -> Option<Request<'_>> {
    let mut q = Request::default();
    fields(buf, |number, wire, r| {
        match (op, number) {
            (_, 1) => q.key = len_field(wire, r)?,
            (OP_PUT, 2) | (OP_CAS, 4) => q.value = len_field(wire, r)?,
            (OP_CAS, 2) => q.has_expected = bool_field(wire, r)?,
            (OP_CAS, 3) => q.expected = len_field(wire, r)?,
            (OP_PUT, 3) | (OP_DELETE, 2) | (OP_CAS, 5) => q.session = Some(session(len_field(wire, r)?)?),
            (OP_PUT, 4) => q.prev_kv = bool_field(wire, r)?,
            _ => return None,
        }
        Some(())
    })?;
    Some(q)
}

fn write(op: u8, buf: &[u8]) -> Option<SessionWrite> {
    let q = request(op, buf)?;
    let s = q.session?;
    // The checks of the general path, which names what is wrong: here, anything wrong defers.
    if q.key.is_empty() || q.key.len() > MAX_KEY_SIZE || q.value.len() > MAX_VALUE_SIZE {
        return None;
    }
    if s.client == 0 || s.sequence == 0 {
        return None;
    }
    let command = match op {
        OP_PUT => Command::Put { key: q.key, value: q.value, prev: q.prev_kv },
        OP_DELETE => Command::Delete { key: q.key },
        _ => Command::Cas { key: q.key, expected: q.has_expected.then_some(q.expected), value: q.value },
    };
    let command = encode(&command).ok()?;
    let mut payload = Vec::with_capacity(SESSION_HEADER_LEN + command.len());
    payload.push(SESSION_KIND);
    payload.extend_from_slice(&s.client.to_le_bytes());
    payload.extend_from_slice(&s.sequence.to_le_bytes());
    payload.extend_from_slice(&s.first_outstanding.min(s.sequence).to_le_bytes());
    payload.extend_from_slice(&command);
    Some(SessionWrite { op, client: s.client, sequence: s.sequence, payload })
}

/// The writes of a `BatchRequest` if it holds only puts, deletes and compare-and-swaps, each
/// with a client session and within the limits, in canonical form; `None` otherwise (and for an
/// empty batch).
pub fn parse_session_writes(request: &[u8]) -> Option<Vec<SessionWrite>> {
    let mut out = Vec::new();
    let mut r = Reader::new(request);
    while !r.done() {
        let (number, wire) = r.tag()?;
        if number != 1 {
            return None;
        }
        let operation = len_field(wire, &mut r)?;
        let mut one = None;
        fields(operation, |number, wire, r| {
            let op = match number {
                1 => OP_PUT,
                3 => OP_DELETE,
                4 => OP_CAS,
                _ => return None, // a get, or a field this build does not know
            };
            if one.is_some() {
                return None;
            }
            one = Some(write(op, len_field(wire, r)?)?);
            Some(())
        })?;
        out.push(one?);
    }
    (!out.is_empty()).then_some(out)
}

/// What one write is answered with.
pub enum Answer<'a> {
    /// The result bytes `apply` returned for it, and its op code.
    Result(u8, &'a [u8]),
    /// Why it failed, as `CODE: details`.
    Error(&'a str),
}

/// A result that carries no error, read as the general path reads it (`dengine.kv.unpack_result`).
struct Plain<'a> {
    ok: bool,
    revision: u64,
    prev: Option<PrevKv<'a>>,
}

struct PrevKv<'a> {
    key: &'a [u8],
    value: &'a [u8],
    create: u64,
    modified: u64,
    version: u64,
}

const FLAG_OK: u8 = 0x01;
const FLAG_PREV: u8 = 0x02;
const HEAD: usize = 18;
const PREV_HEAD: usize = HEAD + 32;

fn u64_at(data: &[u8], pos: usize) -> u64 {
    u64::from_le_bytes(data[pos..pos + 8].try_into().expect("eight bytes"))
}

fn u32_at(data: &[u8], pos: usize) -> usize {
    u32::from_le_bytes(data[pos..pos + 4].try_into().expect("four bytes")) as usize
}

fn plain(data: &[u8]) -> Option<Plain<'_>> {
    if data.len() < HEAD || data[0] != FORMAT_VERSION {
        return None;
    }
    let flags = data[1];
    let revision = u64_at(data, 2);
    if data.len() == HEAD && flags & !FLAG_OK == 0 {
        return Some(Plain { ok: flags == FLAG_OK, revision, prev: None });
    }
    if data.len() < PREV_HEAD || flags & !FLAG_OK != FLAG_PREV {
        return None;
    }
    let (key_len, value_len) = (u32_at(data, HEAD + 24), u32_at(data, HEAD + 28));
    if key_len > MAX_KEY_SIZE || value_len > MAX_VALUE_SIZE || PREV_HEAD + key_len + value_len != data.len() {
        return None;
    }
    let prev = PrevKv {
        key: &data[PREV_HEAD..PREV_HEAD + key_len],
        value: &data[PREV_HEAD + key_len..],
        create: u64_at(data, HEAD),
        modified: u64_at(data, HEAD + 8),
        version: u64_at(data, HEAD + 16),
    };
    Some(Plain { ok: flags & FLAG_OK != 0, revision, prev: Some(prev) })
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

/// Proto3 leaves out a field at its default value.
fn put_uint(out: &mut Vec<u8>, number: u64, v: u64) {
    if v != 0 {
        put_varint(out, number << 3);
        put_varint(out, v);
    }
}

fn put_len(out: &mut Vec<u8>, number: u64, len: usize) {
    put_varint(out, number << 3 | u64::from(WIRE_LEN));
    put_varint(out, len as u64);
}

fn put_bytes(out: &mut Vec<u8>, number: u64, data: &[u8]) {
    if !data.is_empty() {
        put_len(out, number, data.len());
        out.extend_from_slice(data);
    }
}

fn uint_len(number: u64, v: u64) -> usize {
    if v == 0 {
        0
    } else {
        varint_len(number << 3) + varint_len(v)
    }
}

fn bytes_len(number: u64, n: usize) -> usize {
    if n == 0 {
        0
    } else {
        varint_len(number << 3) + varint_len(n as u64) + n
    }
}

fn key_value_len(kv: &PrevKv<'_>) -> usize {
    bytes_len(1, kv.key.len())
        + bytes_len(2, kv.value.len())
        + uint_len(3, kv.create)
        + uint_len(4, kv.modified)
        + uint_len(5, kv.version)
}

fn put_key_value(out: &mut Vec<u8>, number: u64, kv: &PrevKv<'_>) {
    put_len(out, number, key_value_len(kv));
    put_bytes(out, 1, kv.key);
    put_bytes(out, 2, kv.value);
    put_uint(out, 3, kv.create);
    put_uint(out, 4, kv.modified);
    put_uint(out, 5, kv.version);
}

/// The response fields of one write, as (flag or count field, revision field, prev field):
/// PutResponse{revision=1, prev=2}, DeleteResponse{deleted=1, revision=2, prev=3},
/// CompareAndSwapResponse{succeeded=1, revision=2, current=3} (current only on failure).
fn response(out: &mut Vec<u8>, op: u8, r: &Plain<'_>) {
    let (first, revision_field, prev_field) = match op {
        OP_PUT => (0, 1, 2),
        _ => (u64::from(r.ok), 2, 3),
    };
    let prev = r.prev.as_ref().filter(|_| op != OP_CAS || !r.ok);
    let prev_len = prev.map_or(0, |kv| {
        let n = key_value_len(kv);
        varint_len(prev_field << 3) + varint_len(n as u64) + n
    });
    let body = uint_len(1, first) + uint_len(revision_field, r.revision) + prev_len;
    let result_field = match op {
        OP_PUT => 1,
        OP_DELETE => 3,
        _ => 4,
    };
    put_len(out, result_field, body);
    put_uint(out, 1, first);
    put_uint(out, revision_field, r.revision);
    if let Some(kv) = prev {
        put_key_value(out, prev_field, kv);
    }
}

/// Encodes a `BatchResponse` answering each write in order; `None` when a result is not a plain
/// one (an error result, or bytes no store wrote), which the general path then explains.
pub fn encode_write_answers(answers: &[Answer<'_>]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(answers.len() * 24);
    let mut item = Vec::with_capacity(128);
    for answer in answers {
        item.clear();
        match *answer {
            Answer::Result(op, raw) => {
                let r = plain(raw)?;
                if op == OP_PUT && !r.ok {
                    return None; // a put always succeeds: this is not a put's result
                }
                response(&mut item, op, &r);
            }
            Answer::Error(message) => {
                put_len(&mut item, 5, message.len());
                item.extend_from_slice(message.as_bytes());
            }
        }
        put_len(&mut out, 1, item.len());
        out.extend_from_slice(&item);
    }
    Some(out)
}

// --- the client's side ---------------------------------------------------------------------

/// The `Operation` bytes of a write with its session, as a client sends it (`op`: `OP_PUT`,
/// `OP_PUT_PREV` (a put with `prev_kv` set), `OP_DELETE` or `OP_CAS`; `expected` only for a
/// swap, `None` meaning "must be absent").
pub fn encode_write_operation(
    op: u8,
    key: &[u8],
    value: &[u8],
    expected: Option<&[u8]>,
    session: (u64, u64, u64),
) -> Vec<u8> {
    let (client, sequence, first) = session;
    let session_len = uint_len(1, client) + uint_len(2, sequence) + uint_len(3, first);
    let mut body = Vec::with_capacity(24 + key.len() + value.len() + expected.map_or(0, <[u8]>::len));
    put_bytes(&mut body, 1, key);
    let session_field = match op {
        OP_PUT | OP_PUT_PREV => {
            put_bytes(&mut body, 2, value);
            3
        }
        OP_DELETE => 2,
        _ => {
            put_uint(&mut body, 2, u64::from(expected.is_some()));
            put_bytes(&mut body, 3, expected.unwrap_or_default());
            put_bytes(&mut body, 4, value);
            5
        }
    };
    put_len(&mut body, session_field, session_len);
    put_uint(&mut body, 1, client);
    put_uint(&mut body, 2, sequence);
    put_uint(&mut body, 3, first);
    put_uint(&mut body, 4, u64::from(op == OP_PUT_PREV)); // PutRequest.prev_kv, after the session
    let oneof = match op {
        OP_PUT | OP_PUT_PREV => 1,
        OP_DELETE => 3,
        _ => 4,
    };
    let mut out = Vec::with_capacity(body.len() + 6);
    put_len(&mut out, oneof, body.len());
    out.extend_from_slice(&body);
    out
}

/// The `Operation` bytes of a get (`consistency`: the `Consistency` enum's number).
pub fn encode_get_operation(key: &[u8], consistency: u64) -> Vec<u8> {
    let mut body = Vec::with_capacity(key.len() + 8);
    put_bytes(&mut body, 1, key);
    put_uint(&mut body, 2, consistency);
    let mut out = Vec::with_capacity(body.len() + 6);
    put_len(&mut out, 2, body.len());
    out.extend_from_slice(&body);
    out
}

/// A `BatchRequest` carrying the given `Operation` bytes.
pub fn join_operations<'a>(operations: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    for op in operations {
        put_len(&mut out, 1, op.len());
        out.extend_from_slice(op);
    }
    out
}

/// A key-value of a response: key, value, create revision, mod revision, version.
pub type KeyValueFields<'a> = (&'a [u8], &'a [u8], u64, u64, u64);

/// One `OperationResult`, flattened: which response, its flag (found, deleted or succeeded;
/// false for a put), its revision and its key-value (prev, current or the value read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OperationResult<'a> {
    /// `(op code, flag, revision, key-value)`; op code 4 is a get.
    Answer(u8, bool, u64, Option<KeyValueFields<'a>>),
    /// The operation failed: `CODE: details`.
    Error(&'a str),
}

/// The op code a client sees for a get's answer.
pub const OP_GET_ANSWER: u8 = 4;

fn key_value(buf: &[u8]) -> Option<KeyValueFields<'_>> {
    let mut kv: KeyValueFields<'_> = (b"", b"", 0, 0, 0);
    fields(buf, |number, wire, r| {
        match number {
            1 => kv.0 = len_field(wire, r)?,
            2 => kv.1 = len_field(wire, r)?,
            3 => kv.2 = varint_field(wire, r)?,
            4 => kv.3 = varint_field(wire, r)?,
            5 => kv.4 = varint_field(wire, r)?,
            _ => return None,
        }
        Some(())
    })?;
    Some(kv)
}

/// Reads a Put/Get/Delete/CompareAndSwap response whose flag, revision and key-value fields have
/// the given numbers (0: the response has no such field).
fn answer(op: u8, buf: &[u8], flag: u64, revision: u64, kv_field: u64) -> Option<OperationResult<'_>> {
    let (mut f, mut rev, mut kv) = (false, 0, None);
    fields(buf, |number, wire, r| {
        if number == flag && flag != 0 {
            f = bool_field(wire, r)?;
        } else if number == revision {
            rev = varint_field(wire, r)?;
        } else if number == kv_field {
            kv = Some(key_value(len_field(wire, r)?)?);
        } else {
            return None;
        }
        Some(())
    })?;
    Some(OperationResult::Answer(op, f, rev, kv))
}

/// The results of a `BatchResponse` in canonical form, or `None` for anything else (the client
/// then reads it with the protobuf library).
pub fn decode_batch_response(response: &[u8]) -> Option<Vec<OperationResult<'_>>> {
    let mut out = Vec::new();
    let mut r = Reader::new(response);
    while !r.done() {
        let (number, wire) = r.tag()?;
        if number != 1 {
            return None;
        }
        let item = len_field(wire, &mut r)?;
        let mut one = None;
        fields(item, |number, wire, r| {
            if one.is_some() {
                return None;
            }
            let body = len_field(wire, r)?;
            one = Some(match number {
                1 => answer(OP_PUT, body, 0, 1, 2)?,
                2 => answer(OP_GET_ANSWER, body, 1, 3, 2)?,
                3 => answer(OP_DELETE, body, 1, 2, 3)?,
                4 => answer(OP_CAS, body, 1, 2, 3)?,
                5 => OperationResult::Error(std::str::from_utf8(body).ok()?),
                _ => return None,
            });
            Some(())
        })?;
        out.push(one?);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_field_counts_one_field_and_stops_past_the_limit() {
        let op = [0x0a, 0x00]; // field 1, an empty message
        let many: Vec<u8> = op.iter().copied().cycle().take(2 * 1000).collect();
        assert_eq!(count_field(&many, 1, 10_000), Some(1000));
        assert_eq!(count_field(&many, 1, 10), Some(11), "stops counting past the limit");
        let mixed = [0x0a, 0x00, 0x10, 0x05, 0x0a, 0x00, 0x19, 1, 2, 3, 4, 5, 6, 7, 8, 0x25, 1, 2, 3, 4];
        assert_eq!(count_field(&mixed, 1, 100), Some(2));
        assert_eq!(count_field(&mixed, 2, 100), Some(1));
        assert_eq!(count_field(&[0x0a, 0x05, 0x00], 1, 100), None, "a length past the end");
        assert_eq!(count_field(&[0x0b], 1, 100), None, "a group: not a wire type this takes");
        assert_eq!(count_field(&[], 1, 100), Some(0));
    }

    fn len_prefixed(number: u64, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        put_len(&mut out, number, body.len());
        out.extend_from_slice(body);
        out
    }

    fn session_bytes(client: u64, sequence: u64, first: u64) -> Vec<u8> {
        let mut s = Vec::new();
        put_uint(&mut s, 1, client);
        put_uint(&mut s, 2, sequence);
        put_uint(&mut s, 3, first);
        s
    }

    fn put_request(key: &[u8], value: &[u8], session: &[u8]) -> Vec<u8> {
        let mut put = Vec::new();
        put_bytes(&mut put, 1, key);
        put_bytes(&mut put, 2, value);
        put.extend(len_prefixed(3, session));
        len_prefixed(1, &len_prefixed(1, &put))
    }

    #[test]
    fn a_put_with_a_session_becomes_its_envelope_and_command() {
        let request = put_request(b"key", b"value", &session_bytes(7, 9, 12));
        let writes = parse_session_writes(&request).expect("canonical");
        assert_eq!(writes.len(), 1);
        let w = &writes[0];
        assert_eq!((w.op, w.client, w.sequence), (OP_PUT, 7, 9));
        let mut expected = vec![SESSION_KIND];
        for v in [7u64, 9, 9] {
            expected.extend_from_slice(&v.to_le_bytes()); // first outstanding clamped to the sequence
        }
        expected.extend(encode(&Command::Put { key: b"key", value: b"value", prev: false }).unwrap());
        assert_eq!(w.payload, expected);
    }

    #[test]
    fn varints_longer_than_64_bits_are_refused() {
        let mut r = Reader::new(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]);
        assert_eq!(r.varint(), Some(u64::MAX));
        let mut r = Reader::new(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02]);
        assert_eq!(r.varint(), None);
        let mut r = Reader::new(&[0x80]);
        assert_eq!(r.varint(), None, "truncated");
    }

    #[test]
    fn varint_lengths_match_the_encoder() {
        for v in [0u64, 1, 127, 128, 16_383, 16_384, u64::MAX >> 1, u64::MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            assert_eq!(out.len(), varint_len(v), "{v}");
        }
    }

    #[test]
    fn sessions_without_ids_and_unknown_fields_defer_to_the_general_path() {
        assert!(parse_session_writes(&put_request(b"k", b"v", &session_bytes(0, 1, 0))).is_none());
        assert!(parse_session_writes(&put_request(b"k", b"v", &session_bytes(1, 0, 0))).is_none());
        let mut unknown = session_bytes(1, 1, 0);
        put_uint(&mut unknown, 4, 1);
        assert!(parse_session_writes(&put_request(b"k", b"v", &unknown)).is_none());
        assert!(parse_session_writes(&[]).is_none());
    }

    #[test]
    fn answers_encode_as_operation_results() {
        let ok_put = {
            let mut r = vec![FORMAT_VERSION, FLAG_OK];
            r.extend_from_slice(&5u64.to_le_bytes());
            r.extend_from_slice(&0u64.to_le_bytes());
            r
        };
        let out = encode_write_answers(&[Answer::Result(OP_PUT, &ok_put), Answer::Error("UNAVAILABLE: x")])
            .expect("plain results");
        // results { put { revision: 5 } } results { error: "UNAVAILABLE: x" }
        let mut expected = len_prefixed(1, &len_prefixed(1, &[0x08, 5]));
        expected.extend(len_prefixed(1, &len_prefixed(5, b"UNAVAILABLE: x")));
        assert_eq!(out, expected);
        assert!(encode_write_answers(&[Answer::Result(OP_DELETE, b"junk")]).is_none());
    }

    #[test]
    fn what_a_client_sends_the_leader_reads_back() {
        let ops = [
            encode_write_operation(OP_PUT, b"k", b"v", None, (3, 4, 2)),
            encode_write_operation(OP_DELETE, b"k", b"", None, (3, 5, 2)),
            encode_write_operation(OP_CAS, b"k", b"v2", Some(b"v"), (3, 6, 2)),
            encode_write_operation(OP_CAS, b"k", b"v3", None, (3, 7, 2)),
            encode_write_operation(OP_PUT_PREV, b"k", b"v4", None, (3, 8, 2)),
        ];
        let request = join_operations(ops.iter().map(Vec::as_slice));
        let writes = parse_session_writes(&request).expect("canonical");
        let seen: Vec<_> = writes.iter().map(|w| (w.op, w.client, w.sequence)).collect();
        let answered_as = [(OP_PUT, 3, 4), (OP_DELETE, 3, 5), (OP_CAS, 3, 6), (OP_CAS, 3, 7), (OP_PUT, 3, 8)];
        assert_eq!(seen, answered_as, "a put with prev_kv is answered as a put");
        let plain = encode(&Command::Put { key: b"k", value: b"v", prev: false }).unwrap();
        assert!(writes[0].payload.ends_with(&plain));
        let with_prev = encode(&Command::Put { key: b"k", value: b"v4", prev: true }).unwrap();
        assert!(writes[4].payload.ends_with(&with_prev));
        let cas = encode(&Command::Cas { key: b"k", expected: Some(b"v"), value: b"v2" }).unwrap();
        assert!(writes[2].payload.ends_with(&cas));
        let absent = encode(&Command::Cas { key: b"k", expected: None, value: b"v3" }).unwrap();
        assert!(writes[3].payload.ends_with(&absent));
        let with_get = join_operations([ops[0].as_slice(), &encode_get_operation(b"k", 2)]);
        assert!(parse_session_writes(&with_get).is_none(), "a get takes the general path");
    }

    #[test]
    fn what_the_leader_answers_a_client_reads_back() {
        let mut prev = vec![FORMAT_VERSION, FLAG_OK | FLAG_PREV];
        prev.extend_from_slice(&8u64.to_le_bytes());
        prev.extend_from_slice(&0u64.to_le_bytes());
        for v in [2u64, 7, 3] {
            prev.extend_from_slice(&v.to_le_bytes());
        }
        prev.extend_from_slice(&1u32.to_le_bytes());
        prev.extend_from_slice(&2u32.to_le_bytes());
        prev.extend_from_slice(b"kvv");
        let out = encode_write_answers(&[
            Answer::Result(OP_PUT, &prev),
            Answer::Result(OP_DELETE, &prev),
            Answer::Error("UNAVAILABLE: gone"),
        ])
        .unwrap();
        let got = decode_batch_response(&out).expect("canonical");
        let kv = Some((&b"k"[..], &b"vv"[..], 2, 7, 3));
        assert_eq!(
            got,
            [
                OperationResult::Answer(OP_PUT, false, 8, kv),
                OperationResult::Answer(OP_DELETE, true, 8, kv),
                OperationResult::Error("UNAVAILABLE: gone"),
            ]
        );
        assert!(decode_batch_response(&out[..out.len() - 1]).is_none());
    }
}
