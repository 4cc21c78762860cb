//! Quorum arithmetic for Python: `VoteResult` and `JointConfig`.
//!
//! Conversion only; every decision is made by `dengine_core::quorum`. The one rule added here is
//! that a configuration with no voters at all is refused with `ValueError`: the core answers
//! "everything is committed / won" for it (the identity needed to combine halves), which a Python
//! caller would only ever see because of a bug of its own.

use dengine_core::quorum::{JointConfig, MajorityConfig, VoteResult};
use pyo3::exceptions::{PyKeyError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyFrozenSet, PyMapping};

/// The outcome of counting votes: PENDING (keep waiting), LOST (give up) or WON.
#[pyclass(name = "VoteResult", module = "dengine._core", eq, eq_int, frozen, hash)]
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub enum PyVoteResult {
    /// Missing votes could still decide it either way.
    #[pyo3(name = "PENDING")]
    Pending,
    /// A majority can no longer be reached.
    #[pyo3(name = "LOST")]
    Lost,
    /// A majority voted yes.
    #[pyo3(name = "WON")]
    Won,
}

impl From<VoteResult> for PyVoteResult {
    fn from(result: VoteResult) -> Self {
        match result {
            VoteResult::Pending => Self::Pending,
            VoteResult::Lost => Self::Lost,
            VoteResult::Won => Self::Won,
        }
    }
}

/// The voters of a Raft configuration: `incoming` alone, or during a membership change both
/// `incoming` and `outgoing`, each of which must agree by majority. Immutable and hashable.
#[pyclass(name = "JointConfig", module = "dengine._core", frozen, eq, hash)]
#[derive(PartialEq, Eq, Hash)]
pub struct PyJointConfig {
    inner: JointConfig,
}

#[pymethods]
impl PyJointConfig {
    #[new]
    #[pyo3(signature = (incoming, outgoing = None), text_signature = "(incoming, outgoing=())")]
    fn new(incoming: &Bound<'_, PyAny>, outgoing: Option<&Bound<'_, PyAny>>) -> PyResult<Self> {
        let outgoing = match outgoing {
            Some(ids) => majority(ids)?,
            None => MajorityConfig::default(),
        };
        Ok(Self { inner: JointConfig::new(majority(incoming)?, outgoing) })
    }

    /// The voters of the configuration being moved to.
    #[getter]
    fn incoming<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyFrozenSet>> {
        PyFrozenSet::new(py, self.inner.incoming.voters())
    }

    /// The voters of the configuration being left; empty unless joint.
    #[getter]
    fn outgoing<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyFrozenSet>> {
        PyFrozenSet::new(py, self.inner.outgoing.voters())
    }

    /// Every voter of either half.
    #[getter]
    fn voters<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyFrozenSet>> {
        PyFrozenSet::new(py, self.inner.voters())
    }

    /// True while a membership change is in progress.
    #[getter]
    fn is_joint(&self) -> bool {
        self.inner.is_joint()
    }

    /// The highest index acknowledged by a majority of each half; missing ids count as 0.
    fn committed_index(&self, acked: &Bound<'_, PyAny>) -> PyResult<u64> {
        let answers = self.answers::<u64>(acked)?;
        Ok(self.inner.committed_index(|id| lookup(&answers, id)))
    }

    /// WON, LOST or PENDING for yes (`True`) / no (`False`) votes; missing ids have not voted yet.
    fn vote_result(&self, votes: &Bound<'_, PyAny>) -> PyResult<PyVoteResult> {
        let answers = self.answers::<bool>(votes)?;
        Ok(self.inner.vote_result(|id| lookup(&answers, id)).into())
    }

    fn __repr__(&self) -> String {
        let incoming = self.inner.incoming.voters();
        if self.inner.is_joint() {
            format!("JointConfig({incoming:?}, {:?})", self.inner.outgoing.voters())
        } else {
            format!("JointConfig({incoming:?})")
        }
    }
}

impl PyJointConfig {
    /// Reads the answer of every voter (and only voters, so learners' entries are never even
    /// converted) out of a Python mapping, as `(id, answer)` pairs sorted by id.
    fn answers<T>(&self, mapping: &Bound<'_, PyAny>) -> PyResult<Vec<(u64, Option<T>)>>
    where
        T: for<'a, 'py> FromPyObject<'a, 'py, Error = PyErr>,
    {
        let voters = self.inner.voters();
        if voters.is_empty() {
            return Err(PyValueError::new_err("configuration has no voters"));
        }
        voters.into_iter().map(|id| Ok((id, get(mapping, id)?))).collect()
    }
}

/// Builds one half of a configuration from any iterable of non-negative ints.
fn majority(ids: &Bound<'_, PyAny>) -> PyResult<MajorityConfig> {
    let ids = ids.try_iter()?.map(|id| id?.extract::<u64>()).collect::<PyResult<Vec<u64>>>()?;
    Ok(MajorityConfig::new(ids))
}

/// `mapping[id]` converted to `T`, or `None` when the key is absent. Plain dicts take the fast
/// path; any other `collections.abc.Mapping` goes through `__getitem__`.
fn get<T>(mapping: &Bound<'_, PyAny>, id: u64) -> PyResult<Option<T>>
where
    T: for<'a, 'py> FromPyObject<'a, 'py, Error = PyErr>,
{
    if let Ok(dict) = mapping.cast::<PyDict>() {
        return dict.get_item(id)?.map(|value| value.extract()).transpose();
    }
    if mapping.cast::<PyMapping>().is_err() {
        let kind = mapping.get_type().name()?;
        return Err(PyTypeError::new_err(format!("expected a mapping of node id to answer, got {kind}")));
    }
    match mapping.get_item(id) {
        Ok(value) => value.extract().map(Some),
        Err(err) if err.is_instance_of::<PyKeyError>(mapping.py()) => Ok(None),
        Err(err) => Err(err),
    }
}

/// The answer recorded for `id` in pairs sorted by id (as produced by `answers`).
fn lookup<T: Copy>(answers: &[(u64, Option<T>)], id: u64) -> Option<T> {
    answers.binary_search_by_key(&id, |&(voter, _)| voter).ok().and_then(|at| answers[at].1)
}

/// Adds `VoteResult` and `JointConfig` to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyVoteResult>()?;
    m.add_class::<PyJointConfig>()?;
    Ok(())
}
