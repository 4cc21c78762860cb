//! Argument checks shared by both engines, so they reject exactly the same calls.

use super::Entry;
use crate::{Error, Result};

/// `term(index)` is answerable for `first-1 ..= last`.
pub fn check_term(index: u64, first: u64, last: u64) -> Result<()> {
    if index + 1 < first {
        return Err(Error::Compacted { index, first_index: first });
    }
    if index > last {
        return Err(out_of_range("term", index, first, last));
    }
    Ok(())
}

/// `entries(lo, hi)` needs `first <= lo <= hi <= last + 1`.
pub fn check_range(lo: u64, hi: u64, first: u64, last: u64) -> Result<()> {
    if lo > hi {
        return Err(Error::InvalidArgument(format!("entries: lo {lo} is greater than hi {hi}")));
    }
    if lo < first {
        return Err(Error::Compacted { index: lo, first_index: first });
    }
    if hi > last + 1 {
        return Err(out_of_range("entries", hi - 1, first, last));
    }
    Ok(())
}

/// A batch must continue the log without gaps and without terms going backwards.
pub fn check_append(entries: &[Entry], last: u64, last_term: u64, first: u64) -> Result<()> {
    let Some(head) = entries.first() else {
        return Ok(());
    };
    if head.index != last + 1 {
        return Err(Error::IndexOutOfRange {
            index: head.index,
            first_index: first,
            last_index: last,
            op: "append (the batch must start at last_index + 1)",
        });
    }
    let mut prev_term = last_term;
    for (i, e) in entries.iter().enumerate() {
        if e.index != head.index + i as u64 {
            return Err(Error::InvalidArgument(format!(
                "append: entry {} of the batch has index {}, expected {}",
                i,
                e.index,
                head.index + i as u64
            )));
        }
        if e.term < prev_term {
            return Err(Error::InvalidArgument(format!(
                "append: term of entry {} ({}) is lower than the term before it ({prev_term})",
                e.index, e.term
            )));
        }
        if e.data.len() > u32::MAX as usize - super::record::HEADER_LEN {
            return Err(Error::InvalidArgument(format!(
                "append: entry {} payload of {} bytes exceeds the 4 GiB record limit",
                e.index,
                e.data.len()
            )));
        }
        prev_term = e.term;
    }
    Ok(())
}

/// `truncate_suffix(index)` needs `first <= index <= last + 1` (the latter is a no-op).
pub fn check_truncate(index: u64, first: u64, last: u64) -> Result<()> {
    if index < first {
        return Err(Error::Compacted { index, first_index: first });
    }
    if index > last + 1 {
        return Err(out_of_range("truncate_suffix", index, first, last));
    }
    Ok(())
}

/// `compact_prefix(index)` needs `first - 1 <= index <= last` (the former is a no-op).
pub fn check_compact(index: u64, first: u64, last: u64) -> Result<()> {
    if index + 1 < first {
        return Err(Error::Compacted { index, first_index: first });
    }
    if index > last {
        return Err(out_of_range("compact_prefix", index, first, last));
    }
    Ok(())
}

fn out_of_range(op: &'static str, index: u64, first: u64, last: u64) -> Error {
    Error::IndexOutOfRange { index, first_index: first, last_index: last, op }
}
