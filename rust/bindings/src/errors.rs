//! The dengine exception hierarchy, created once here and re-exported by `dengine.errors`.
//!
//! DengineError
//! └── StorageError            (I/O failures, naming the file)
//!     ├── CorruptLogError     (CRC or framing failure before the tail; names file and offset)
//!     ├── LogCompactedError   (index below the first index)
//!     ├── LogIndexError       (index beyond the last index, or an append that leaves a gap)
//!     ├── LogClosedError      (use after close)
//!     ├── SnapshotChunkError  (out-of-order, duplicate-with-different-bytes or corrupt chunk)
//!     └── SnapshotIntegrityError (assembled file has the wrong size or SHA-256)
//! └── KVSnapshotError         (a KV snapshot is corrupt, truncated or of an unknown format)
//! KVCommandError (a ValueError) (KV command bytes are malformed or break a limit)
//!
//! Bad arguments map to the built-in `ValueError`, as any Python API would.

use dengine_core::Error;
use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;

pyo3::create_exception!(dengine._core, DengineError, PyException, "Base class of every dengine error.");
pyo3::create_exception!(
    dengine._core,
    StorageError,
    DengineError,
    "A storage operation failed; the message names the file."
);
pyo3::create_exception!(
    dengine._core,
    CorruptLogError,
    StorageError,
    "Stored log data failed verification before the tail; the message names the file and offset."
);
pyo3::create_exception!(
    dengine._core,
    LogCompactedError,
    StorageError,
    "The requested log index was compacted away."
);
pyo3::create_exception!(
    dengine._core,
    LogIndexError,
    StorageError,
    "The requested log index lies beyond the last index, or an append would leave a gap."
);
pyo3::create_exception!(dengine._core, LogClosedError, StorageError, "The log store was closed.");
pyo3::create_exception!(dengine._core, SnapshotChunkError, StorageError, "A snapshot chunk was rejected.");
pyo3::create_exception!(
    dengine._core,
    SnapshotIntegrityError,
    StorageError,
    "An assembled snapshot does not match its declared size or SHA-256."
);

pyo3::create_exception!(
    dengine._core,
    KVSnapshotError,
    DengineError,
    "A KV snapshot is corrupt, truncated or of an unknown format; the state was left untouched."
);
pyo3::create_exception!(
    dengine._core,
    KVCommandError,
    PyValueError,
    "A KV command is malformed or breaks a limit; always bad input, hence a ValueError."
);

/// Converts a core error into the matching Python exception.
pub fn to_py(err: Error) -> PyErr {
    let msg = err.to_string();
    match err {
        Error::Io { .. } => StorageError::new_err(msg),
        Error::Corrupt { .. } => CorruptLogError::new_err(msg),
        Error::Compacted { .. } => LogCompactedError::new_err(msg),
        Error::IndexOutOfRange { .. } => LogIndexError::new_err(msg),
        Error::SnapshotChunk(_) => SnapshotChunkError::new_err(msg),
        Error::SnapshotIntegrity(_) => SnapshotIntegrityError::new_err(msg),
        Error::InvalidArgument(_) => PyValueError::new_err(msg),
        Error::Closed => LogClosedError::new_err(msg),
        Error::KvSnapshot(_) => KVSnapshotError::new_err(msg),
    }
}

/// Adds every exception class to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("DengineError", py.get_type::<DengineError>())?;
    m.add("StorageError", py.get_type::<StorageError>())?;
    m.add("CorruptLogError", py.get_type::<CorruptLogError>())?;
    m.add("LogCompactedError", py.get_type::<LogCompactedError>())?;
    m.add("LogIndexError", py.get_type::<LogIndexError>())?;
    m.add("LogClosedError", py.get_type::<LogClosedError>())?;
    m.add("SnapshotChunkError", py.get_type::<SnapshotChunkError>())?;
    m.add("SnapshotIntegrityError", py.get_type::<SnapshotIntegrityError>())?;
    m.add("KVSnapshotError", py.get_type::<KVSnapshotError>())?;
    m.add("KVCommandError", py.get_type::<KVCommandError>())?;
    Ok(())
}
