//! Reading a serialized `dengine.v1.SnapshotChunk` message (proto/dengine/v1/raft.proto) without
//! copying its data: a receiver learns where the header, the offset, the CRC and the chunk's bytes
//! lie in the buffer as it arrived, and the bytes go from that buffer straight to the file.
//!
//! Only the protobuf wire format is needed: fields are `tag = (number << 3) | wire type`, then a
//! varint, a fixed 64- or 32-bit value, or a length and that many bytes. Unknown fields are
//! skipped, as protobuf does; anything malformed is refused.

use std::ops::Range;

use crate::{Error, Result};

/// Where the parts of one `SnapshotChunk` message lie in its serialized bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkFields {
    /// The serialized `SnapshotHeader` (field 1).
    pub header: Range<usize>,
    /// Field 2.
    pub offset: u64,
    /// The chunk's bytes (field 3).
    pub data: Range<usize>,
    /// Field 4.
    pub crc32c: u32,
}

const VARINT: u64 = 0;
const FIXED64: u64 = 1;
const LENGTH_DELIMITED: u64 = 2;
const FIXED32: u64 = 5;

/// Parses a serialized `SnapshotChunk`; a missing field reads as empty or zero, as in protobuf.
pub fn parse_chunk_message(buf: &[u8]) -> Result<ChunkFields> {
    let mut fields = ChunkFields { header: 0..0, offset: 0, data: 0..0, crc32c: 0 };
    let mut at = 0usize;
    while at < buf.len() {
        let tag = varint(buf, &mut at)?;
        let (number, wire_type) = (tag >> 3, tag & 7);
        match (number, wire_type) {
            (1, LENGTH_DELIMITED) => fields.header = length_delimited(buf, &mut at)?,
            (2, VARINT) => fields.offset = varint(buf, &mut at)?,
            (3, LENGTH_DELIMITED) => fields.data = length_delimited(buf, &mut at)?,
            (4, VARINT) => {
                let crc = varint(buf, &mut at)?;
                fields.crc32c =
                    u32::try_from(crc).map_err(|_| malformed(format!("crc32c {crc} is out of range")))?;
            }
            (1..=4, _) => return Err(malformed(format!("field {number} has wire type {wire_type}"))),
            (_, VARINT) => {
                varint(buf, &mut at)?;
            }
            (_, FIXED64) => at = skip(buf, at, 8)?,
            (_, LENGTH_DELIMITED) => {
                length_delimited(buf, &mut at)?;
            }
            (_, FIXED32) => at = skip(buf, at, 4)?,
            _ => return Err(malformed(format!("unsupported wire type {wire_type}"))),
        }
    }
    Ok(fields)
}

fn malformed(detail: String) -> Error {
    Error::SnapshotChunk(format!("malformed snapshot chunk message: {detail}"))
}

fn varint(buf: &[u8], at: &mut usize) -> Result<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let Some(&byte) = buf.get(*at) else {
            return Err(malformed("truncated varint".into()));
        };
        *at += 1;
        value |= u64::from(byte & 0x7F) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(malformed("varint longer than 10 bytes".into()))
}

fn length_delimited(buf: &[u8], at: &mut usize) -> Result<Range<usize>> {
    let len = varint(buf, at)?;
    let start = *at;
    let len = usize::try_from(len).map_err(|_| malformed(format!("length {len} is out of range")))?;
    *at = skip(buf, start, len)?;
    Ok(start..*at)
}

fn skip(buf: &[u8], at: usize, len: usize) -> Result<usize> {
    match at.checked_add(len) {
        Some(end) if end <= buf.len() => Ok(end),
        _ => {
            Err(malformed(format!("a field of {len} bytes at {at} runs past the end ({} bytes)", buf.len())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put_varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    fn message(header: &[u8], offset: u64, data: &[u8], crc: u64) -> Vec<u8> {
        let mut m = vec![0x0A];
        put_varint(&mut m, header.len() as u64);
        m.extend_from_slice(header);
        m.push(0x10);
        put_varint(&mut m, offset);
        m.push(0x1A);
        put_varint(&mut m, data.len() as u64);
        m.extend_from_slice(data);
        m.push(0x20);
        put_varint(&mut m, crc);
        m
    }

    #[test]
    fn finds_every_field_in_place() {
        let data = vec![7u8; 300];
        let m = message(b"hdr", 1 << 40, &data, 0xDEAD_BEEF);
        let f = parse_chunk_message(&m).unwrap();
        assert_eq!(&m[f.header.clone()], b"hdr");
        assert_eq!(&m[f.data.clone()], &data[..]);
        assert_eq!((f.offset, f.crc32c), (1 << 40, 0xDEAD_BEEF));
    }

    #[test]
    fn unknown_fields_are_skipped_and_missing_ones_are_zero() {
        let mut m = vec![0x28, 0x05, 0x31, 1, 2, 3, 4, 5, 6, 7, 8, 0x3D, 1, 2, 3, 4, 0x42, 2, 9, 9];
        m.extend(message(b"", 0, b"", 0));
        let f = parse_chunk_message(&m).unwrap();
        assert_eq!((f.header.len(), f.offset, f.data.len(), f.crc32c), (0, 0, 0, 0));
        assert_eq!(parse_chunk_message(&[]).unwrap().data, 0..0);
    }

    #[test]
    fn malformed_messages_are_refused() {
        let good = message(b"h", 5, b"data", 1);
        for cut in 1..good.len() {
            if let Ok(f) = parse_chunk_message(&good[..cut]) {
                // A cut exactly between fields parses, with the later fields missing.
                assert!(f.crc32c == 0, "cut at {cut}");
            }
        }
        let wrong_type = [0x11, 0, 0, 0, 0, 0, 0, 0, 0]; // field 2 as fixed64
        assert!(parse_chunk_message(&wrong_type).is_err());
        assert!(parse_chunk_message(&[0x20, 0x80, 0x80, 0x80, 0x80, 0x10]).is_err(), "crc past 32 bits");
        assert!(parse_chunk_message(&[0x1A, 0xFF, 0xFF, 0xFF, 0xFF, 0x0F]).is_err(), "length past the end");
        let eleven_byte_varint = [0x10, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x01];
        assert!(parse_chunk_message(&eleven_byte_varint).is_err());
        assert!(parse_chunk_message(&[0x0B]).is_err(), "groups are not supported");
    }
}
