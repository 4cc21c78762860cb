//! `dengine._core`: a thin PyO3 layer over `dengine-core`.
//!
//! Nothing here decides behaviour; each file converts arguments, releases the GIL through
//! [`gil::detach`] around anything slow, and maps errors through [`errors::to_py`].

#[cfg(unix)]
mod applier;
mod entry_batch;
mod errors;
mod gil;
mod kv;
mod log;
#[cfg(unix)]
mod loop_thread;
mod quorum;
mod sessions;
mod sha256;
mod snapshot;
#[cfg(unix)]
mod syncer;
mod write_behind;

#[pyo3::pymodule]
mod _core {
    use pyo3::prelude::*;

    #[pymodule_init]
    fn init(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add("__version__", env!("CARGO_PKG_VERSION"))?;
        crate::errors::register(m)?;
        crate::entry_batch::register(m)?;
        crate::kv::register(m)?;
        crate::log::register(m)?;
        crate::quorum::register(m)?;
        crate::sessions::register(m)?;
        crate::snapshot::register(m)?;
        crate::sha256::register(m)?;
        crate::write_behind::register(m)?;
        #[cfg(unix)]
        crate::syncer::register(m)?;
        #[cfg(unix)]
        crate::applier::register(m)?;
        Ok(())
    }
}
