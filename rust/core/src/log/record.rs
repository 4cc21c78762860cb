//! On-disk framing of one log record.
//!
//! ```text
//! offset  size  field
//!      0     4  header_crc   CRC32C of bytes 4..28
//!      4     4  len          payload length in bytes
//!      8     8  index        Raft log index
//!     16     8  term         Raft term
//!     24     4  payload_crc  CRC32C of the payload
//!     28   len  payload
//! ```
//!
//! The header has its own CRC so that a damaged length field is caught before it is trusted:
//! recovery must never mistake a corrupt length for a torn tail and cut valid records after it.

/// Bytes of framing in front of every payload.
pub const HEADER_LEN: usize = 28;

/// A decoded record header; the payload follows it on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub len: u32,
    pub index: u64,
    pub term: u64,
    pub payload_crc: u32,
}

impl Header {
    /// Total bytes the record occupies on disk.
    pub fn record_len(&self) -> u64 {
        HEADER_LEN as u64 + u64::from(self.len)
    }
}

/// Appends one framed record to `out`.
pub fn encode(out: &mut Vec<u8>, index: u64, term: u64, payload: &[u8]) {
    let len = u32::try_from(payload.len()).expect("payload length checked by the caller");
    let start = out.len();
    out.extend_from_slice(&[0u8; 4]);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&index.to_le_bytes());
    out.extend_from_slice(&term.to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    let crc = crc32c::crc32c(&out[start + 4..start + HEADER_LEN]);
    out[start..start + 4].copy_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(payload);
}

/// Decodes a header, or `None` when its CRC does not match.
pub fn decode_header(buf: &[u8; HEADER_LEN]) -> Option<Header> {
    let stored = u32::from_le_bytes(buf[0..4].try_into().ok()?);
    if crc32c::crc32c(&buf[4..]) != stored {
        return None;
    }
    Some(Header {
        len: u32::from_le_bytes(buf[4..8].try_into().ok()?),
        index: u64::from_le_bytes(buf[8..16].try_into().ok()?),
        term: u64::from_le_bytes(buf[16..24].try_into().ok()?),
        payload_crc: u32::from_le_bytes(buf[24..28].try_into().ok()?),
    })
}

/// Whether `payload` matches the CRC recorded in its header.
pub fn payload_ok(header: &Header, payload: &[u8]) -> bool {
    payload.len() == header.len as usize && crc32c::crc32c(payload) == header.payload_crc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header_of(buf: &[u8]) -> Option<Header> {
        decode_header(buf[..HEADER_LEN].try_into().unwrap())
    }

    #[test]
    fn round_trip() {
        let mut buf = Vec::new();
        encode(&mut buf, 7, 3, b"hello");
        assert_eq!(buf.len(), HEADER_LEN + 5);
        let h = header_of(&buf).unwrap();
        assert_eq!((h.index, h.term, h.len), (7, 3, 5));
        assert!(payload_ok(&h, &buf[HEADER_LEN..]));
    }

    #[test]
    fn any_header_bit_flip_is_detected() {
        let mut buf = Vec::new();
        encode(&mut buf, 1, 1, b"x");
        for bit in 0..HEADER_LEN * 8 {
            let mut copy = buf.clone();
            copy[bit / 8] ^= 1 << (bit % 8);
            assert!(header_of(&copy).is_none(), "flip of bit {bit} went unnoticed");
        }
    }

    #[test]
    fn payload_bit_flip_is_detected() {
        let mut buf = Vec::new();
        encode(&mut buf, 1, 1, b"payload");
        buf[HEADER_LEN + 2] ^= 0x10;
        let h = header_of(&buf).unwrap();
        assert!(!payload_ok(&h, &buf[HEADER_LEN..]));
    }
}
