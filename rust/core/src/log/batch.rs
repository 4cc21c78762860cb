//! [`EncodedBatch`]: a batch of entries already framed as WAL records, in one buffer.
//!
//! Appends go through this form so that an entry's payload is copied exactly once, from the
//! caller's bytes into the buffer that is then written to disk as is. It is also the shape a
//! batch has on the wire between peers: a follower can append what the leader sent without
//! building one object per entry.

use super::bounds;
use super::record::{self, HEADER_LEN};
use crate::{Error, Result};

/// Consecutive entries framed as records. Built with [`EncodedBatch::push`], which enforces
/// consecutive indexes and non-decreasing terms inside the batch; whether the batch continues
/// a particular log is checked by the store at append time.
#[derive(Debug, Default, Clone)]
pub struct EncodedBatch {
    pub(super) buf: Vec<u8>,
    /// Offset of each record in `buf`.
    pub(super) starts: Vec<u64>,
    first_index: u64,
    first_term: u64,
    last_term: u64,
    /// `(index, term)` wherever the term changes, so stores can index terms without decoding.
    term_runs: Vec<(u64, u64)>,
}

impl EncodedBatch {
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty batch with room for `entries` records of about `payload_bytes` in total.
    pub fn with_capacity(entries: usize, payload_bytes: usize) -> Self {
        EncodedBatch {
            buf: Vec::with_capacity(payload_bytes + entries * HEADER_LEN),
            starts: Vec::with_capacity(entries),
            ..Self::default()
        }
    }

    /// Frames one entry at the end of the batch.
    pub fn push(&mut self, index: u64, term: u64, data: &[u8]) -> Result<()> {
        bounds::check_value("index", index)?;
        bounds::check_value("term", term)?;
        if let Some(expected) = self.next_index() {
            if index != expected {
                return Err(Error::InvalidArgument(format!(
                    "append: entry {} of the batch has index {index}, expected {expected}",
                    self.starts.len()
                )));
            }
            if term < self.last_term {
                return Err(Error::InvalidArgument(format!(
                    "append: term of entry {index} ({term}) is lower than the term before it ({})",
                    self.last_term
                )));
            }
        } else {
            self.first_index = index;
            self.first_term = term;
        }
        if data.len() > u32::MAX as usize - HEADER_LEN {
            return Err(Error::InvalidArgument(format!(
                "append: entry {index} payload of {} bytes exceeds the 4 GiB record limit",
                data.len()
            )));
        }
        if self.starts.is_empty() || term != self.last_term {
            self.term_runs.push((index, term));
        }
        self.starts.push(self.buf.len() as u64);
        record::encode(&mut self.buf, index, term, data);
        self.last_term = term;
        Ok(())
    }

    /// Notes a record that a store has already put in `buf` at offset `start`, framed and
    /// verified (read back from its own log): nothing is copied or encoded again. The caller
    /// guarantees that it is one whole record for `index` and `term`, following the last one.
    pub(super) fn note_framed(&mut self, index: u64, term: u64, start: usize) {
        debug_assert!(self.next_index().is_none_or(|next| next == index), "records out of order");
        if self.starts.is_empty() {
            self.first_index = index;
            self.first_term = term;
        }
        if self.starts.is_empty() || term != self.last_term {
            self.term_runs.push((index, term));
        }
        self.starts.push(start as u64);
        self.last_term = term;
    }

    /// Parses and verifies a batch produced by another node's [`EncodedBatch::as_bytes`]:
    /// every header and payload checksum, consecutive indexes and non-decreasing terms. The
    /// bytes come from the network, so nothing is trusted before it is checked.
    pub fn from_bytes(buf: Vec<u8>) -> Result<EncodedBatch> {
        let mut batch = EncodedBatch { buf: Vec::new(), ..Self::default() };
        let mut pos = 0usize;
        while pos < buf.len() {
            let bad = |why: &str| Error::InvalidArgument(format!("entry batch: {why} at byte {pos}"));
            let header: &[u8; HEADER_LEN] = buf
                .get(pos..pos + HEADER_LEN)
                .and_then(|h| h.try_into().ok())
                .ok_or_else(|| bad("truncated header"))?;
            let h = record::decode_header(header).ok_or_else(|| bad("header checksum mismatch"))?;
            let body = buf
                .get(pos + HEADER_LEN..pos + HEADER_LEN + h.len as usize)
                .ok_or_else(|| bad("truncated payload"))?;
            if !record::payload_ok(&h, body) {
                return Err(bad("payload checksum mismatch"));
            }
            if let Some(expected) = batch.next_index() {
                if h.index != expected || h.term < batch.last_term {
                    return Err(bad("entries out of order"));
                }
            } else {
                bounds::check_value("index", h.index)?;
                batch.first_index = h.index;
                batch.first_term = h.term;
            }
            bounds::check_value("term", h.term)?;
            if batch.starts.is_empty() || h.term != batch.last_term {
                batch.term_runs.push((h.index, h.term));
            }
            batch.starts.push(pos as u64);
            batch.last_term = h.term;
            pos += HEADER_LEN + h.len as usize;
        }
        batch.buf = buf;
        Ok(batch)
    }

    /// The framed records, ready to travel as one bytes field.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }

    fn next_index(&self) -> Option<u64> {
        (!self.starts.is_empty()).then(|| self.first_index + self.starts.len() as u64)
    }

    pub fn len(&self) -> usize {
        self.starts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.starts.is_empty()
    }

    /// Index of the first entry (meaningless for an empty batch).
    pub fn first_index(&self) -> u64 {
        self.first_index
    }

    /// Term of the first entry (meaningless for an empty batch).
    pub fn first_term(&self) -> u64 {
        self.first_term
    }

    /// `(first index, term)` of each run of equal terms.
    pub fn term_runs(&self) -> &[(u64, u64)] {
        &self.term_runs
    }

    /// `(index, term, payload)` of every entry, in order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64, &[u8])> + '_ {
        (0..self.starts.len()).map(move |i| self.record_at(i))
    }

    fn record_at(&self, position: usize) -> (u64, u64, &[u8]) {
        let at = self.starts[position] as usize;
        let header: &[u8; HEADER_LEN] = self.buf[at..at + HEADER_LEN].try_into().expect("framed record");
        let h = record::decode_header(header).expect("records in a batch are framed by push");
        (
            self.first_index + position as u64,
            h.term,
            &self.buf[at + HEADER_LEN..at + HEADER_LEN + h.len as usize],
        )
    }

    /// `(index, term, payload)` of the entry at `position` (0 is the first).
    pub fn get(&self, position: usize) -> Option<(u64, u64, &[u8])> {
        (position < self.starts.len()).then(|| self.record_at(position))
    }

    /// The entries at positions `start..end` as a batch of their own: their records copied in
    /// one piece, nothing encoded again.
    pub fn range(&self, start: usize, end: usize) -> EncodedBatch {
        let end = end.min(self.starts.len());
        if start >= end {
            return EncodedBatch::new();
        }
        let from = self.starts[start];
        let to = self.starts.get(end).map_or(self.buf.len(), |&s| s as usize);
        let first_index = self.first_index + start as u64;
        let last_index = self.first_index + end as u64 - 1;
        let term_at = |position: usize| self.record_at(position).1;
        let mut term_runs = vec![(first_index, term_at(start))];
        term_runs.extend(self.term_runs.iter().filter(|&&(i, _)| i > first_index && i <= last_index));
        EncodedBatch {
            buf: self.buf[from as usize..to].to_vec(),
            starts: self.starts[start..end].iter().map(|s| s - from).collect(),
            first_index,
            first_term: term_runs[0].1,
            last_term: term_at(end - 1),
            term_runs,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn get_and_range_read_single_entries_and_sub_batches() {
        let mut b = EncodedBatch::new();
        for (i, term) in [(5u64, 1u64), (6, 1), (7, 2), (8, 2)] {
            b.push(i, term, format!("e{i}").as_bytes()).unwrap();
        }
        assert_eq!(b.get(2), Some((7, 2, &b"e7"[..])));
        assert_eq!(b.get(4), None);
        let tail = b.range(1, 10);
        assert_eq!(tail.iter().map(|(i, t, _)| (i, t)).collect::<Vec<_>>(), [(6, 1), (7, 2), (8, 2)]);
        assert_eq!(tail.term_runs(), &[(6, 1), (7, 2)]);
        let again = EncodedBatch::from_bytes(tail.as_bytes().to_vec()).unwrap();
        assert_eq!(again.len(), 3);
        assert!(b.range(3, 3).is_empty());
    }

    #[test]
    fn push_frames_and_iter_reads_back() {
        let mut b = EncodedBatch::new();
        b.push(5, 1, b"a").unwrap();
        b.push(6, 2, b"").unwrap();
        b.push(7, 2, b"ccc").unwrap();
        let got: Vec<_> = b.iter().map(|(i, t, d)| (i, t, d.to_vec())).collect();
        assert_eq!(got, vec![(5, 1, b"a".to_vec()), (6, 2, vec![]), (7, 2, b"ccc".to_vec())]);
        assert_eq!((b.len(), b.first_index(), b.first_term()), (3, 5, 1));
    }

    #[test]
    fn from_bytes_round_trips_and_rejects_damage() {
        let mut b = EncodedBatch::new();
        for i in 10..20 {
            b.push(i, 1 + i / 15, format!("p{i}").as_bytes()).unwrap();
        }
        let back = EncodedBatch::from_bytes(b.as_bytes().to_vec()).unwrap();
        assert_eq!(back.iter().collect::<Vec<_>>(), b.iter().collect::<Vec<_>>());
        assert_eq!(back.term_runs(), b.term_runs());
        for at in 0..b.as_bytes().len() {
            let mut bad = b.as_bytes().to_vec();
            bad[at] ^= 0x40;
            assert!(EncodedBatch::from_bytes(bad).is_err(), "flip at {at} accepted");
        }
        let whole = b.as_bytes();
        assert!(EncodedBatch::from_bytes(whole[..whole.len() - 1].to_vec()).is_err());
        assert!(EncodedBatch::from_bytes(Vec::new()).unwrap().is_empty());
    }

    #[test]
    fn push_rejects_gaps_and_falling_terms() {
        let mut b = EncodedBatch::new();
        b.push(1, 3, b"").unwrap();
        assert!(matches!(b.push(3, 3, b""), Err(Error::InvalidArgument(_))));
        assert!(matches!(b.push(2, 2, b""), Err(Error::InvalidArgument(_))));
        assert_eq!(b.len(), 1, "a rejected push leaves the batch unchanged");
    }
}
