//! KV command bytes in, result bytes out: the formats of `dengine.kv`'s module docstring.
//!
//! Parsing is strict because the bytes come from the Raft log, which any client can fill: every
//! length is checked against the limits and the bytes that remain, and unknown versions, ops,
//! flags and trailing bytes are refused with a message saying where.

use super::{Record, FORMAT_VERSION, MAX_KEY_SIZE, MAX_VALUE_SIZE};

/// Operation codes, the second byte of a command.
pub const OP_PUT: u8 = 1;
pub const OP_DELETE: u8 = 2;
pub const OP_CAS: u8 = 3;
pub const OP_DELETE_RANGE: u8 = 4;
/// A put whose result carries the key-value it replaced (etcd's `prev_kv`). Plain puts leave it
/// out: most callers never read it, and every replica would build and keep it for each write.
pub const OP_PUT_PREV: u8 = 5;

const FLAG_OK: u8 = 0x01;
const FLAG_PREV: u8 = 0x02;
const FLAG_ERROR: u8 = 0x04;

/// One decoded command, borrowing its fields from the command bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command<'a> {
    /// Set `key` to `value`; `prev`: the result carries the key-value replaced, if any.
    Put { key: &'a [u8], value: &'a [u8], prev: bool },
    /// Remove `key` if present.
    Delete { key: &'a [u8] },
    /// Set `key` to `value` if its value equals `expected` (`None`: only if the key is absent).
    Cas { key: &'a [u8], expected: Option<&'a [u8]>, value: &'a [u8] },
    /// Remove every key starting with `prefix`.
    DeleteRange { prefix: &'a [u8] },
}

impl Command<'_> {
    /// The op code of this command.
    pub fn op(&self) -> u8 {
        match self {
            Command::Put { prev: false, .. } => OP_PUT,
            Command::Put { prev: true, .. } => OP_PUT_PREV,
            Command::Delete { .. } => OP_DELETE,
            Command::Cas { .. } => OP_CAS,
            Command::DeleteRange { .. } => OP_DELETE_RANGE,
        }
    }
}

fn op_name(op: u8) -> Option<&'static str> {
    match op {
        OP_PUT => Some("PUT"),
        OP_DELETE => Some("DELETE"),
        OP_CAS => Some("CAS"),
        OP_DELETE_RANGE => Some("DELETE_RANGE"),
        OP_PUT_PREV => Some("PUT_PREV"),
        _ => None,
    }
}

fn u32_at(data: &[u8], pos: usize) -> u32 {
    u32::from_le_bytes(data[pos..pos + 4].try_into().expect("four bytes"))
}

/// Reads one u32-length-prefixed field at `pos`; returns it and the position after it.
fn read_field<'a>(
    data: &'a [u8],
    pos: usize,
    what: &str,
    limit: usize,
    op: &str,
) -> Result<(&'a [u8], usize), String> {
    let end = data.len();
    if pos + 4 > end {
        return Err(format!(
            "{op} command truncated at byte {pos}: the {what} length needs 4 bytes, {} remain",
            end - pos
        ));
    }
    let length = u32_at(data, pos) as usize;
    if length > limit {
        return Err(format!("{op} command: {what} is {length} bytes, over the {limit}-byte limit"));
    }
    let pos = pos + 4;
    if pos + length > end {
        return Err(format!(
            "{op} command truncated at byte {pos}: the {what} needs {length} bytes, {} remain",
            end - pos
        ));
    }
    Ok((&data[pos..pos + length], pos + length))
}

/// Validates command bytes; the error says precisely what is wrong, in the words the Python
/// encoders use, since it travels back to the client inside an error result.
pub fn parse(data: &[u8]) -> Result<Command<'_>, String> {
    let size = data.len();
    if size < 2 {
        return Err(format!("command truncated: {size} bytes, a command starts with 2 (version, op)"));
    }
    let (version, op) = (data[0], data[1]);
    if version != FORMAT_VERSION {
        return Err(format!(
            "unsupported command format version {version}; this build reads version {FORMAT_VERSION}"
        ));
    }
    let Some(name) = op_name(op) else {
        return Err(format!("unknown command op {op}; known ops are 1 to 5"));
    };
    let command;
    let mut pos;
    if op == OP_DELETE_RANGE {
        let (prefix, after) = read_field(data, 2, "prefix", MAX_KEY_SIZE, name)?;
        pos = after;
        command = Command::DeleteRange { prefix };
    } else {
        let (key, after) = read_field(data, 2, "key", MAX_KEY_SIZE, name)?;
        pos = after;
        if key.is_empty() {
            return Err(format!("{name} command: key must not be empty"));
        }
        let mut expected = None;
        if op == OP_CAS {
            if pos >= size {
                return Err(format!(
                    "{name} command truncated at byte {pos}: the has_expected flag is missing"
                ));
            }
            let flag = data[pos];
            pos += 1;
            match flag {
                0 => {}
                1 => {
                    let (field, after) = read_field(data, pos, "expected value", MAX_VALUE_SIZE, name)?;
                    expected = Some(field);
                    pos = after;
                }
                _ => return Err(format!("{name} command: has_expected flag is {flag}, must be 0 or 1")),
            }
        }
        command = match op {
            OP_DELETE => Command::Delete { key },
            _ => {
                let (value, after) = read_field(data, pos, "value", MAX_VALUE_SIZE, name)?;
                pos = after;
                if op == OP_PUT || op == OP_PUT_PREV {
                    Command::Put { key, value, prev: op == OP_PUT_PREV }
                } else {
                    Command::Cas { key, expected, value }
                }
            }
        };
    }
    if pos != size {
        return Err(format!("{name} command has {} trailing bytes after byte {pos}", size - pos));
    }
    Ok(command)
}

fn check(what: &str, data: &[u8], limit: usize, allow_empty: bool) -> Result<(), String> {
    if data.is_empty() && !allow_empty {
        return Err(format!("{what} must not be empty"));
    }
    if data.len() > limit {
        return Err(format!("{what} is {} bytes, over the {limit}-byte limit", data.len()));
    }
    Ok(())
}

fn push_field(out: &mut Vec<u8>, data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(data);
}

/// Encodes a command, checking the limits first: the error names the field and the limit, in
/// the words the Python encoders have always used.
pub fn encode(command: &Command<'_>) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    match *command {
        Command::Put { key, value, .. } => {
            check("key", key, MAX_KEY_SIZE, false)?;
            check("value", value, MAX_VALUE_SIZE, true)?;
            out.reserve(10 + key.len() + value.len());
            out.extend_from_slice(&[FORMAT_VERSION, command.op()]);
            push_field(&mut out, key);
            push_field(&mut out, value);
        }
        Command::Delete { key } => {
            check("key", key, MAX_KEY_SIZE, false)?;
            out.extend_from_slice(&[FORMAT_VERSION, OP_DELETE]);
            push_field(&mut out, key);
        }
        Command::Cas { key, expected, value } => {
            check("key", key, MAX_KEY_SIZE, false)?;
            check("value", value, MAX_VALUE_SIZE, true)?;
            out.extend_from_slice(&[FORMAT_VERSION, OP_CAS]);
            push_field(&mut out, key);
            match expected {
                None => out.push(0),
                Some(expected) => {
                    check("expected value", expected, MAX_VALUE_SIZE, true)?;
                    out.push(1);
                    push_field(&mut out, expected);
                }
            }
            push_field(&mut out, value);
        }
        Command::DeleteRange { prefix } => {
            check("prefix", prefix, MAX_KEY_SIZE, true)?;
            out.extend_from_slice(&[FORMAT_VERSION, OP_DELETE_RANGE]);
            push_field(&mut out, prefix);
        }
    }
    Ok(out)
}

/// Encodes a result: `ok`, the store revision after the command, the key before it (if any),
/// how many keys it removed. Error results go through [`encode_error`].
pub fn encode_result(ok: bool, revision: u64, prev: Option<(&[u8], &Record)>, deleted: u64) -> Vec<u8> {
    let mut flags = if ok { FLAG_OK } else { 0 };
    let extra = prev.map_or(0, |(key, rec)| 32 + key.len() + rec.value.len());
    let mut out = Vec::with_capacity(18 + extra);
    if prev.is_some() {
        flags |= FLAG_PREV;
    }
    out.push(FORMAT_VERSION);
    out.push(flags);
    out.extend_from_slice(&revision.to_le_bytes());
    out.extend_from_slice(&deleted.to_le_bytes());
    if let Some((key, rec)) = prev {
        encode_key_value(&mut out, key, rec);
    }
    out
}

/// Encodes the result of a malformed command: not ok, nothing changed, and why.
pub fn encode_error(revision: u64, message: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(22 + message.len());
    out.push(FORMAT_VERSION);
    out.push(FLAG_ERROR);
    out.extend_from_slice(&revision.to_le_bytes());
    out.extend_from_slice(&0u64.to_le_bytes());
    out.extend_from_slice(&(message.len() as u32).to_le_bytes());
    out.extend_from_slice(message.as_bytes());
    out
}

/// Appends the `kv` layout shared by results and snapshots: create, mod, version, key length,
/// value length, key, value.
pub fn encode_key_value(out: &mut Vec<u8>, key: &[u8], rec: &Record) {
    out.extend_from_slice(&rec.create_revision.to_le_bytes());
    out.extend_from_slice(&rec.mod_revision.to_le_bytes());
    out.extend_from_slice(&rec.version.to_le_bytes());
    out.extend_from_slice(&(key.len() as u32).to_le_bytes());
    out.extend_from_slice(&(rec.value.len() as u32).to_le_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(&rec.value);
}
