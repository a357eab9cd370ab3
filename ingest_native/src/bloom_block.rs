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

/// Each 32-byte key of `blob`: the byte offset of its block (the top 18 bits of its first
/// 32-bit word, native byte order as `memoryview(blob).cast("I")` reads it, times 64) and
/// its eight bits in the block (the low 9 bits of each of its eight words).
fn positions(blob: &[u8]) -> PyResult<impl Iterator<Item = (usize, [u16; 8])> + '_> {
    if blob.len() % 32 != 0 {
        return Err(PyValueError::new_err("keys are 32-byte digests"));
    }
    Ok(blob.chunks_exact(32).map(|k| {
        let mut bits = [0u16; 8];
        let mut first = 0u32;
        for (j, w) in k.chunks_exact(4).enumerate() {
            let word = u32::from_ne_bytes([w[0], w[1], w[2], w[3]]);
            if j == 0 {
                first = word;
            }
            bits[j] = (word & 511) as u16;
        }
        (((first >> (32 - BLOCK_BITS_LOG)) as usize) << 6, bits)
    }))
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
    // The GIL is held and nothing else reads or resizes the bytearray meanwhile.
    let b = unsafe { bits.as_bytes_mut() };
    for (at, offs) in positions(blob)? {
        for o in offs {
            b[at + (o as usize >> 3)] |= 1 << (o & 7);
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
    if blob.len() % 32 != 0 {
        return Err(PyValueError::new_err("keys are 32-byte digests"));
    }
    let b = unsafe { bits.as_bytes() };
    let word = |k: &[u8], j: usize| {
        u32::from_ne_bytes([k[4 * j], k[4 * j + 1], k[4 * j + 2], k[4 * j + 3]])
    };
    Ok(blob
        .chunks_exact(32)
        .enumerate()
        .filter(|(_, k)| {
            let first = word(k, 0);
            let at = ((first >> (32 - BLOCK_BITS_LOG)) as usize) << 6;
            (0..8).all(|j| {
                let o = (if j == 0 { first } else { word(k, j) } & 511) as usize;
                b[at + (o >> 3)] >> (o & 7) & 1 == 1
            })
        })
        .map(|(i, _)| i)
        .collect())
}
