//! The idempotency store's key filter as a blocked Bloom filter (`ingest.state.sqlite_idem`,
//! `_Bloom`): a key's eight bits all in one 64-byte block of the 16 MiB filter, so adding or
//! asking a key touches one cache line, not eight. Eight bits spread over the whole filter cost
//! eight cache misses a key: ~0.145 µs a key added against ~0.025 when the lines were cached,
//! and every worker adds every key claimed in the file (docs/benchmarks.md, idemscale).

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyByteArray;

/// 2^18 blocks of 512 bits: 2^27 bits, `_Bloom.BITS`.
const BLOCK_BITS_LOG: u32 = 18;

type Key = [u8; 32];

/// The 32-byte keys of `blob` (as arrays: their words are read without bounds checks).
fn keys(blob: &[u8]) -> PyResult<impl Iterator<Item = &Key> + '_> {
    if blob.len() % 32 != 0 {
        return Err(PyValueError::new_err("keys are 32-byte digests"));
    }
    Ok(blob.chunks_exact(32).map(|k| <&Key>::try_from(k).expect("32 bytes")))
}

/// A key's `j`th 32-bit word, native byte order as `memoryview(blob).cast("I")` reads it.
fn word(k: &Key, j: usize) -> u32 {
    u32::from_ne_bytes([k[4 * j], k[4 * j + 1], k[4 * j + 2], k[4 * j + 3]])
}

/// The byte offset of a key's block: the top 18 bits of its first word, times 64.
fn block(k: &Key) -> usize {
    ((word(k, 0) >> (32 - BLOCK_BITS_LOG)) as usize) << 6
}

/// A key's `j`th bit in its block: the low 9 bits of its `j`th word.
fn bit(k: &Key, j: usize) -> usize {
    (word(k, j) & 511) as usize
}

fn check(bits: &Bound<'_, PyByteArray>) -> PyResult<()> {
    if bits.len() != 64 << BLOCK_BITS_LOG {
        return Err(PyValueError::new_err("a Bloom filter's bits are 16 MiB"));
    }
    Ok(())
}

/// `KeyFilter.add` of one filter: set the eight bits of every key of `blob`.
#[pyfunction]
pub fn bloom_block_add(bits: &Bound<'_, PyByteArray>, blob: &[u8]) -> PyResult<()> {
    check(bits)?;
    let keys = keys(blob)?;
    // The GIL is held and nothing else reads or resizes the bytearray meanwhile.
    let b = unsafe { bits.as_bytes_mut() };
    for k in keys {
        let at = block(k);
        for j in 0..8 {
            let o = bit(k, j);
            b[at + (o >> 3)] |= 1 << (o & 7);
        }
    }
    Ok(())
}

/// `KeyFilter.maybe` of one filter: the indexes of the keys of `blob` whose eight bits are set
/// (each key's words read only while its bits so far are set: most keys asked were never
/// added, and the first bit rules them out).
#[pyfunction]
pub fn bloom_block_maybe(bits: &Bound<'_, PyByteArray>, blob: &[u8]) -> PyResult<Vec<usize>> {
    check(bits)?;
    let keys = keys(blob)?;
    let b = unsafe { bits.as_bytes() };
    Ok(keys
        .enumerate()
        .filter(|(_, k)| {
            let at = block(k);
            (0..8).all(|j| {
                let o = bit(k, j);
                b[at + (o >> 3)] >> (o & 7) & 1 == 1
            })
        })
        .map(|(i, _)| i)
        .collect())
}
