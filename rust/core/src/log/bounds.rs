//! Argument checks shared by both engines, so they reject exactly the same calls.

use super::EncodedBatch;
use crate::{Error, Result};

/// The largest index or term the log accepts. Keeping them within `i64` leaves headroom for the
/// `+ 1` arithmetic everywhere and maps cleanly onto every wire format and language.
pub const MAX_INDEX: u64 = i64::MAX as u64;

/// Rejects indexes and terms above [`MAX_INDEX`], before any arithmetic touches them.
pub fn check_value(what: &str, value: u64) -> Result<()> {
    if value > MAX_INDEX {
        return Err(Error::InvalidArgument(format!("{what} {value} exceeds the maximum {MAX_INDEX}")));
    }
    Ok(())
}

/// `term(index)` is answerable for `first-1 ..= last`.
pub fn check_term(index: u64, first: u64, last: u64) -> Result<()> {
    check_value("index", index)?;
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
    check_value("index", lo)?;
    check_value("index", hi)?;
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

/// A batch must start right after the last entry, with a term no lower than the last one.
/// (Consecutive indexes and terms inside the batch are enforced as it is built.)
pub fn check_append(batch: &EncodedBatch, last: u64, last_term: u64, first: u64) -> Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    if batch.first_index() != last + 1 {
        return Err(Error::IndexOutOfRange {
            index: batch.first_index(),
            first_index: first,
            last_index: last,
            op: "append (the batch must start at last_index + 1)",
        });
    }
    if batch.first_term() < last_term {
        return Err(Error::InvalidArgument(format!(
            "append: term of entry {} ({}) is lower than the term before it ({last_term})",
            batch.first_index(),
            batch.first_term()
        )));
    }
    Ok(())
}

/// `truncate_suffix(index)` needs `first <= index <= last + 1` (the latter is a no-op).
pub fn check_truncate(index: u64, first: u64, last: u64) -> Result<()> {
    check_value("index", index)?;
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
    check_value("index", index)?;
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
