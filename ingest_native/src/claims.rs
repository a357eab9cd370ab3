//! Whether a batch's dedupe keys may meet the keys a worker claimed since its idempotency
//! lookup was sent (`ingest.pipeline.recent.ClaimLog`, `Pipeline._drop_duplicates`). A Python
//! set of the claimed batch's 5,000 keys and `isdisjoint` against the new batch hashed every
//! key with SipHash, twice, on the event loop (~145 ns a key); the keys are SHA-256 digests,
//! so their first 8 bytes are already a uniform hash.

use std::collections::HashSet;
use std::hash::{BuildHasherDefault, Hasher};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};

/// A `u64` that is (a key's first 8 bytes) taken as its own hash, mixed once so that keys
/// that are not digests (tests, a caller's own) do not all land in one bucket.
#[derive(Default)]
struct Mixed(u64);

impl Hasher for Mixed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, _: &[u8]) {
        unreachable!("only u64s are hashed")
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29);
    }
}

/// A key's first 8 bytes (zero-padded when shorter): equal keys give equal values, so two
/// lists whose values are disjoint share no key.
fn head(key: &Bound<'_, PyBytes>) -> u64 {
    let b = key.as_bytes();
    let mut first = [0u8; 8];
    let n = b.len().min(8);
    first[..n].copy_from_slice(&b[..n]);
    u64::from_ne_bytes(first)
}

/// False when no bytes object of `claimed` equals one of `keys` (both lists of bytes); True
/// when some may (two keys share their first 8 bytes: then the caller checks exactly), and
/// whenever an item is not a bytes object. Never False for lists that share a key.
#[pyfunction]
pub fn keys_may_meet(claimed: &Bound<'_, PyList>, keys: &Bound<'_, PyList>) -> bool {
    let (small, large) = if claimed.len() <= keys.len() { (claimed, keys) } else { (keys, claimed) };
    let mut heads: HashSet<u64, BuildHasherDefault<Mixed>> =
        HashSet::with_capacity_and_hasher(small.len(), BuildHasherDefault::default());
    for item in small.iter() {
        match item.downcast::<PyBytes>() {
            Ok(key) => heads.insert(head(key)),
            Err(_) => return true,
        };
    }
    for item in large.iter() {
        match item.downcast::<PyBytes>() {
            Ok(key) if !heads.contains(&head(key)) => {}
            _ => return true,
        }
    }
    false
}

/// The idempotency store's blob of a batch's keys (`ingest.state.sqlite_idem._key_blob`):
/// the keys joined, each checked to be a 32-byte bytes object, in one pass. Its Python twin
/// checks the lengths by a set of them and then joins: ~135 ns a key on the event loop, twice
/// a record (`seen` and `claim`).
#[pyfunction]
pub fn key_blob<'py>(py: Python<'py>, keys: &Bound<'py, PyList>) -> PyResult<Bound<'py, PyBytes>> {
    let n = keys.len();
    let mut held: Vec<Bound<'py, PyBytes>> = Vec::with_capacity(n);
    for item in keys.iter() {
        match item.downcast_into::<PyBytes>() {
            Ok(key) if key.as_bytes().len() == 32 => held.push(key),
            _ => return Err(PyValueError::new_err("idempotency keys are 32-byte digests")),
        }
    }
    PyBytes::new_bound_with(py, n * 32, |buf| {
        for (chunk, key) in buf.chunks_exact_mut(32).zip(held.iter()) {
            chunk.copy_from_slice(key.as_bytes());
        }
        Ok(())
    })
}
