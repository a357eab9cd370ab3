//! The decoder's fast path for the common valid record, in one pass per line: parse the JSON,
//! check the shape of schema_version 3 (types, const, enum, lengths, bounds, the relations'
//! patterns, no unknown or repeated key), write the canonical bytes (orjson's OPT_SORT_KEYS
//! output, byte for byte) and hash them, then build the Python objects the `Record` carries.
//!
//! It answers None for anything it does not handle exactly (a repeated key, an integer beyond
//! 64 bits, a float that is not finite, a lone surrogate, nesting past 64, any other shape);
//! the Python side then takes its own path for that line, which alone explains failures. The
//! rules left to Python: tenant of the route, tenant/entity_type patterns, known attributes,
//! occurred_at (format, future). `ingest/pipeline/decode.py` turns this path off when the
//! schema is not the one it was written for (`SCHEMA_SHA256`).
use std::borrow::Cow;
use std::io::Write;

use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyList, PySet, PyString, PyTuple};
use sha2::{Digest, Sha256};

mod flock;
mod bloom_block;
mod claims;

/// The fingerprint of the schema these rules were written from: sha256 of
/// `orjson.dumps(load_schema(), option=OPT_SORT_KEYS)`.
const SCHEMA_SHA256: &str = "27771e5aca5fe626cdaf254c8f062103230d1f1402fd4bab65cc0f730b9bcd74";

const MAX_DEPTH: u32 = 64;

enum V<'a> {
    Null,
    Bool(bool),
    I(i64),
    U(u64),
    /// a float and its text as sent (`write_float` may take its digits from there)
    F(f64, &'a str),
    S(Cow<'a, str>),
    A(Vec<V<'a>>),
    O(Vec<(Cow<'a, str>, V<'a>)>),
}

struct P<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> P<'a> {
    fn ws(&mut self) {
        while let Some(c) = self.b.get(self.i) {
            match c {
                b' ' | b'\t' | b'\n' | b'\r' => self.i += 1,
                _ => break,
            }
        }
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn lit(&mut self, word: &[u8], v: V<'a>) -> Option<V<'a>> {
        if self.b.get(self.i..self.i + word.len())? == word {
            self.i += word.len();
            Some(v)
        } else {
            None
        }
    }

    fn value(&mut self, depth: u32) -> Option<V<'a>> {
        self.ws();
        match self.peek()? {
            b'{' => {
                if depth >= MAX_DEPTH {
                    return None;
                }
                self.i += 1;
                let mut items = Vec::new();
                self.ws();
                if self.peek() == Some(b'}') {
                    self.i += 1;
                    return Some(V::O(items));
                }
                loop {
                    self.ws();
                    if self.peek()? != b'"' {
                        return None;
                    }
                    self.i += 1;
                    let k = self.string()?;
                    self.ws();
                    if self.peek()? != b':' {
                        return None;
                    }
                    self.i += 1;
                    let v = self.value(depth + 1)?;
                    items.push((k, v));
                    self.ws();
                    match self.peek()? {
                        b',' => self.i += 1,
                        b'}' => {
                            self.i += 1;
                            return Some(V::O(items));
                        }
                        _ => return None,
                    }
                }
            }
            b'[' => {
                if depth >= MAX_DEPTH {
                    return None;
                }
                self.i += 1;
                let mut items = Vec::new();
                self.ws();
                if self.peek() == Some(b']') {
                    self.i += 1;
                    return Some(V::A(items));
                }
                loop {
                    items.push(self.value(depth + 1)?);
                    self.ws();
                    match self.peek()? {
                        b',' => self.i += 1,
                        b']' => {
                            self.i += 1;
                            return Some(V::A(items));
                        }
                        _ => return None,
                    }
                }
            }
            b'"' => {
                self.i += 1;
                Some(V::S(self.string()?))
            }
            b't' => self.lit(b"true", V::Bool(true)),
            b'f' => self.lit(b"false", V::Bool(false)),
            b'n' => self.lit(b"null", V::Null),
            b'-' | b'0'..=b'9' => self.number(),
            _ => None,
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.i;
        while let Some(b'0'..=b'9') = self.peek() {
            self.i += 1;
        }
        self.i - start
    }

    fn number(&mut self) -> Option<V<'a>> {
        let start = self.i;
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        match self.peek()? {
            b'0' => self.i += 1,
            b'1'..=b'9' => {
                self.digits();
            }
            _ => return None,
        }
        let mut float = false;
        if self.peek() == Some(b'.') {
            float = true;
            self.i += 1;
            if self.digits() == 0 {
                return None;
            }
        }
        if let Some(b'e' | b'E') = self.peek() {
            float = true;
            self.i += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            if self.digits() == 0 {
                return None;
            }
        }
        let b: &'a [u8] = self.b;
        // SAFETY: the bytes read above are digits, '-', '+', '.', 'e' or 'E': ASCII
        let text = unsafe { std::str::from_utf8_unchecked(&b[start..self.i]) };
        if float {
            let f: f64 = text.parse().ok()?;
            if f.is_finite() {
                Some(V::F(f, text))
            } else {
                None
            }
        } else if let Ok(n) = text.parse::<i64>() {
            Some(V::I(n))
        } else {
            text.parse::<u64>().ok().map(V::U)
        }
    }

    fn hex4(&mut self) -> Option<u32> {
        let h = self.b.get(self.i..self.i + 4)?;
        let mut n = 0u32;
        for &c in h {
            n = n * 16 + (c as char).to_digit(16)?;
        }
        self.i += 4;
        Some(n)
    }

    /// A string's content, after its opening quote; None for anything but valid UTF-8 with
    /// valid escapes (a lone surrogate included).
    fn string(&mut self) -> Option<Cow<'a, str>> {
        let start = self.i;
        let b: &'a [u8] = self.b;
        // eight bytes at a time while none is a quote, a backslash, a control character or
        // past ASCII (most strings: keys, names, times); then byte by byte
        self.i = plain_prefix(b, start);
        let mut high = 0u8; // any byte >= 0x80 seen: then the text's UTF-8 is checked
        loop {
            let c = self.peek()?;
            if c == b'"' {
                let text = &b[start..self.i];
                let s = if high < 0x80 {
                    // SAFETY: every byte of `text` is below 0x80 (the prefix by
                    // `plain_prefix`, the rest by `high`): ASCII is UTF-8
                    unsafe { std::str::from_utf8_unchecked(text) }
                } else {
                    std::str::from_utf8(text).ok()?
                };
                self.i += 1;
                return Some(Cow::Borrowed(s));
            }
            if c == b'\\' {
                break;
            }
            if c < 0x20 {
                return None;
            }
            high |= c;
            self.i += 1;
        }
        let mut out: Vec<u8> = self.b[start..self.i].to_vec();
        loop {
            let c = self.peek()?;
            self.i += 1;
            match c {
                b'"' => return String::from_utf8(out).ok().map(Cow::Owned),
                b'\\' => {
                    let e = self.peek()?;
                    self.i += 1;
                    match e {
                        b'"' => out.push(b'"'),
                        b'\\' => out.push(b'\\'),
                        b'/' => out.push(b'/'),
                        b'b' => out.push(8),
                        b'f' => out.push(12),
                        b'n' => out.push(b'\n'),
                        b'r' => out.push(b'\r'),
                        b't' => out.push(b'\t'),
                        b'u' => {
                            let h = self.hex4()?;
                            let cp = if (0xD800..0xDC00).contains(&h) {
                                if self.b.get(self.i..self.i + 2)? != b"\\u" {
                                    return None;
                                }
                                self.i += 2;
                                let l = self.hex4()?;
                                if !(0xDC00..0xE000).contains(&l) {
                                    return None;
                                }
                                0x10000 + ((h - 0xD800) << 10) + (l - 0xDC00)
                            } else if (0xDC00..0xE000).contains(&h) {
                                return None;
                            } else {
                                h
                            };
                            let ch = char::from_u32(cp)?;
                            let mut buf = [0u8; 4];
                            out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                        }
                        _ => return None,
                    }
                }
                c if c < 0x20 => return None,
                c => out.push(c),
            }
        }
    }
}

/// Where the first byte at or after `i` that a string's fast scan stops at is: a quote, a
/// backslash, a control character or one past ASCII, found eight bytes at a time (the bit
/// tricks of "Bit Twiddling Hacks": a word's lowest flagged byte is always such a byte; a
/// borrow can only flag bytes above it); the last few bytes of `b` are left to the caller's
/// byte loop.
fn plain_prefix(b: &[u8], mut i: usize) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    while let Some(word) = b.get(i..i + 8) {
        let mut w = [0u8; 8];
        w.copy_from_slice(word);
        let w = u64::from_le_bytes(w);
        let quote = w ^ (ONES * u64::from(b'"'));
        let slash = w ^ (ONES * u64::from(b'\\'));
        let stop = (quote.wrapping_sub(ONES) & !quote)
            | (slash.wrapping_sub(ONES) & !slash)
            | (w.wrapping_sub(ONES * 0x20) & !w)
            | w;
        let stop = stop & HIGH;
        if stop != 0 {
            return i + (stop.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    i
}

fn parse(b: &[u8]) -> Option<V<'_>> {
    let mut p = P { b, i: 0 };
    let v = p.value(0)?;
    p.ws();
    if p.i == b.len() {
        Some(v)
    } else {
        None
    }
}

// ---- canonical bytes: orjson.dumps(..., option=OPT_SORT_KEYS), byte for byte ----

/// A parsed string's text: one the parser borrowed from the line (`Cow::Borrowed`: it read no
/// escape, and it stops at a quote or a backslash and refuses control characters) holds
/// nothing `write_str` escapes, so it is copied as it is; one it unescaped goes through
/// `write_str`.
fn write_text(s: &Cow<str>, out: &mut Vec<u8>) {
    match s {
        Cow::Borrowed(text) => {
            out.push(b'"');
            out.extend_from_slice(text.as_bytes());
            out.push(b'"');
        }
        Cow::Owned(text) => write_str(text, out),
    }
}

/// An integer's decimal text, as `write!(out, "{}", n)` writes it, without the formatting
/// machinery (a record's revision, its integer attributes).
fn write_int(n: i128, out: &mut Vec<u8>) {
    let mut buf = [0u8; 40];
    let mut at = buf.len();
    let mut m = n.unsigned_abs();
    loop {
        at -= 1;
        buf[at] = b'0' + (m % 10) as u8;
        m /= 10;
        if m == 0 {
            break;
        }
    }
    if n < 0 {
        at -= 1;
        buf[at] = b'-';
    }
    out.extend_from_slice(&buf[at..]);
}

fn write_str(s: &str, out: &mut Vec<u8>) {
    out.push(b'"');
    let b = s.as_bytes();
    if !b.iter().any(|&c| c < 0x20 || c == b'"' || c == b'\\') {
        out.extend_from_slice(b);
        out.push(b'"');
        return;
    }
    let mut run = 0;
    for (i, &c) in b.iter().enumerate() {
        let esc: &[u8] = match c {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            8 => b"\\b",
            9 => b"\\t",
            10 => b"\\n",
            12 => b"\\f",
            13 => b"\\r",
            0..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&b[run..i]);
        run = i + 1;
        if esc.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.extend_from_slice(b"\\u00");
            out.push(HEX[(c >> 4) as usize]);
            out.push(HEX[(c & 15) as usize]);
        } else {
            out.extend_from_slice(esc);
        }
    }
    out.extend_from_slice(&b[run..]);
    out.push(b'"');
}

/// orjson's float text: the shortest round-trip digits, fixed notation for decimal exponents
/// -5..=15 (`0.00001`, `1000000000000000.0`), else `1.5e-7`, `1e+16`.
/// Rust's shortest digits end in an odd digit where the exact value lies halfway between
/// two shortest texts (70368744177664.125 -> ...64.13); orjson (ryu), like Python's repr,
/// takes the even one (...64.12). Make that choice here: when the text one lower in its last
/// digit reads back as the same number too, and the exact value is that text plus half a
/// last digit, take the lower one.
fn half_to_even(f: f64, digits: &mut [u8], exp: i32) {
    let n = digits.len();
    let Some(&last) = digits.last() else { return };
    if (last - b'0') % 2 == 0 || (n == 1 && last == b'1') {
        return;
    }
    // Two texts of at most 15 significant digits never read back as the same normal f64
    // (DBL_DIG: 15 digits survive the round trip text -> f64 -> text), so the lower text
    // cannot be another reading of `f`: no tie to break. (A subnormal holds fewer digits.)
    if n <= 15 && f.abs() >= f64::MIN_POSITIVE {
        return;
    }
    let text = |d: &[u8]| {
        let (first, rest) = d.split_at(1);
        let first = std::str::from_utf8(first).unwrap_or("0");
        let rest = std::str::from_utf8(rest).unwrap_or("");
        format!("{}.{}e{}", first, if rest.is_empty() { "0" } else { rest }, exp)
    };
    let mut lower = digits.to_vec();
    lower[n - 1] -= 1;
    if text(&lower).parse::<f64>().ok() != Some(f.abs()) {
        return;
    }
    // the exact decimal value of f (Rust's fixed-precision formatting is exact)
    let exact = format!("{:.*e}", 1100, f.abs());
    let (mant, e) = exact.split_once('e').unwrap_or((&exact, "0"));
    if e.parse::<i32>().ok() != Some(exp) {
        return;
    }
    let all: Vec<u8> = mant.bytes().filter(|c| *c != b'.').collect();
    if all.len() > n && all[..n] == lower[..] && all[n] == b'5' && all[n + 1..].iter().all(|c| *c == b'0') {
        digits[n - 1] -= 1;
    }
}

/// The significant digits of a JSON number's text (leading and trailing zeros left out) and
/// the decimal exponent of the first, when there are 1 to 15 of them; else None.
fn sent_digits(text: &str) -> Option<([u8; 15], usize, i32)> {
    let b = text.as_bytes();
    let mut i = usize::from(b.first() == Some(&b'-'));
    let mut digits = [0u8; 15];
    let mut n = 0;
    let mut zeros = 0; // zeros read after the last significant digit, not yet kept
    let mut point: i64 = 0; // digits before the decimal point, leading zeros not counted
    let mut fraction = false;
    while let Some(&c) = b.get(i) {
        match c {
            b'0' if n == 0 => {
                if fraction {
                    point -= 1;
                }
            }
            b'0' => {
                zeros += 1;
                if !fraction {
                    point += 1;
                }
            }
            b'1'..=b'9' => {
                if n + zeros + 1 > 15 {
                    return None;
                }
                for _ in 0..zeros {
                    digits[n] = b'0';
                    n += 1;
                }
                zeros = 0;
                digits[n] = c;
                n += 1;
                if !fraction {
                    point += 1;
                }
            }
            b'.' => fraction = true,
            _ => break,
        }
        i += 1;
    }
    if n == 0 {
        return None;
    }
    let mut exp: i64 = 0;
    if let Some(b'e' | b'E') = b.get(i) {
        let rest = &text[i + 1..];
        let (minus, rest) = match rest.as_bytes().first() {
            Some(b'-') => (true, &rest[1..]),
            Some(b'+') => (false, &rest[1..]),
            _ => (false, rest),
        };
        if rest.len() > 6 {
            return None;
        }
        exp = rest.parse().ok()?;
        if minus {
            exp = -exp;
        }
    }
    Some((digits, n, i32::try_from(point - 1 + exp).ok()?))
}

fn write_float(f: f64, text: &str, out: &mut Vec<u8>) {
    if f == 0.0 {
        out.extend_from_slice(if f.is_sign_negative() { b"-0.0" } else { b"0.0" });
        return;
    }
    // Sent with at most 15 significant digits (most amounts, prices, rates): those digits
    // are the shortest text that reads back as `f` (DBL_DIG: no two texts of at most 15
    // digits read as one normal f64, so no shorter one does, nor another as short), which
    // is what the formatting below would find, at ~10x the cost.
    if f.abs() >= f64::MIN_POSITIVE {
        if let Some((digits, n, exp)) = sent_digits(text) {
            return layout(f.is_sign_negative(), &digits[..n], exp, out);
        }
    }
    let mut buf = [0u8; 40];
    let len = {
        let mut cur: &mut [u8] = &mut buf;
        let _ = write!(cur, "{:e}", f);
        40 - cur.len()
    };
    let sci = std::str::from_utf8(&buf[..len]).unwrap_or("0e0");
    let (mant, exp) = sci.split_once('e').unwrap_or((sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (neg, mant) = match mant.strip_prefix('-') {
        Some(m) => (true, m),
        None => (false, mant),
    };
    let mut dbuf = [0u8; 32];
    let mut nd = 0;
    for &c in mant.as_bytes() {
        if c != b'.' && nd < 32 {
            dbuf[nd] = c;
            nd += 1;
        }
    }
    half_to_even(f, &mut dbuf[..nd], exp);
    layout(neg, &dbuf[..nd], exp, out);
}

/// orjson's text of a float whose shortest digits and decimal exponent these are.
fn layout(neg: bool, digits: &[u8], exp: i32, out: &mut Vec<u8>) {
    if neg {
        out.push(b'-');
    }
    if (-5..16).contains(&exp) {
        if exp >= 0 {
            let whole = exp as usize + 1;
            for k in 0..whole {
                out.push(*digits.get(k).unwrap_or(&b'0'));
            }
            out.push(b'.');
            if digits.len() > whole {
                out.extend_from_slice(&digits[whole..]);
            } else {
                out.push(b'0');
            }
        } else {
            out.extend_from_slice(b"0.");
            for _ in 0..(-exp - 1) {
                out.push(b'0');
            }
            out.extend_from_slice(digits);
        }
    } else {
        out.push(digits[0]);
        if digits.len() > 1 {
            out.push(b'.');
            out.extend_from_slice(&digits[1..]);
        }
        out.push(b'e');
        out.push(if exp > 0 { b'+' } else { b'-' });
        out.extend_from_slice(exp.unsigned_abs().to_string().as_bytes());
    }
}

/// None when an object repeats a key (the Python side decides what that means).
fn write(v: &V, out: &mut Vec<u8>) -> Option<()> {
    match v {
        V::Null => out.extend_from_slice(b"null"),
        V::Bool(true) => out.extend_from_slice(b"true"),
        V::Bool(false) => out.extend_from_slice(b"false"),
        V::I(n) => write_int(i128::from(*n), out),
        V::U(n) => write_int(i128::from(*n), out),
        V::F(f, text) => write_float(*f, text, out),
        V::S(s) => write_text(s, out),
        V::A(items) => {
            out.push(b'[');
            for (k, item) in items.iter().enumerate() {
                if k > 0 {
                    out.push(b',');
                }
                write(item, out)?;
            }
            out.push(b']');
        }
        V::O(items) if items.windows(2).all(|w| w[0].0.as_bytes() < w[1].0.as_bytes()) => {
            // sent in order, no key twice (most objects: the sender's encoder sorted them):
            // no sorted copy to build
            out.push(b'{');
            for (k, (key, item)) in items.iter().enumerate() {
                if k > 0 {
                    out.push(b',');
                }
                write_text(key, out);
                out.push(b':');
                write(item, out)?;
            }
            out.push(b'}');
        }
        V::O(items) => {
            let mut sorted: Vec<&(Cow<str>, V)> = items.iter().collect();
            sorted.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push(b'{');
            for (k, (key, item)) in sorted.iter().map(|e| (&e.0, &e.1)).enumerate() {
                if k > 0 {
                    if sorted[k - 1].0 == *key {
                        return None;
                    }
                    out.push(b',');
                }
                write_text(key, out);
                out.push(b':');
                write(item, out)?;
            }
            out.push(b'}');
        }
    }
    Some(())
}

/// Python strings of a batch for the texts that repeat (object keys, tenants, entity types):
/// one string (and its cached hash) per distinct text, as msgspec's key cache does.
struct Names<'py> {
    py: Python<'py>,
    seen: std::collections::HashMap<String, Bound<'py, PyString>, Fnv>,
    /// the last 4 per-record names asked for (`get`): a batch's tenant, entity type and
    /// priority come back record after record, and are found here by a comparison or two,
    /// without hashing. Attribute keys and relation names go to `seen` alone (`key`): with
    /// them here too, a body's names rotated through the slots and every one missed.
    recent: [Option<Recent<'py>>; 4],
    /// where the next text goes in `recent` (the oldest's place)
    next: usize,
}

/// A slot of `Names::recent`: the text in place (at most `RECENT_BYTES`), so a miss that
/// takes a slot allocates nothing; the old `String` a slot cost a malloc and a free a miss.
struct Recent<'py> {
    len: usize,
    text: [u8; RECENT_BYTES],
    v: Bound<'py, PyString>,
}

/// The longest text `Names` keeps (in `recent` and in `seen`).
const RECENT_BYTES: usize = 64;

/// FNV-1a for `Names`' short texts: the default SipHash (built against hash flooding) cost
/// ~1,500 instructions a record for its ~6 lookups; the keys here are a batch's own field
/// names and values of at most 64 bytes, and the map stops growing at 4,096 of them.
#[derive(Default, Clone, Copy)]
struct Fnv(u64);

impl std::hash::Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut h = self.0;
        for b in bytes {
            h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = h;
    }
}

impl std::hash::BuildHasher for Fnv {
    type Hasher = Fnv;
    fn build_hasher(&self) -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl<'py> Names<'py> {
    /// A per-record name (tenant, entity type, priority): the recent slots first.
    fn get(&mut self, s: &str) -> Bound<'py, PyString> {
        for slot in self.recent.iter().flatten() {
            if slot.text[..slot.len] == *s.as_bytes() {
                return slot.v.clone();
            }
        }
        let v = self.key(s);
        if s.len() <= RECENT_BYTES {
            let mut text = [0u8; RECENT_BYTES];
            text[..s.len()].copy_from_slice(s.as_bytes());
            self.recent[self.next] = Some(Recent { len: s.len(), text, v: v.clone() });
            self.next = (self.next + 1) % self.recent.len();
        }
        v
    }

    /// Any other name (an attribute's key, a relation's type): the map alone.
    fn key(&mut self, s: &str) -> Bound<'py, PyString> {
        match self.seen.get(s) {
            Some(v) => v.clone(),
            None => {
                let v = py_text(self.py, s);
                if self.seen.len() < 4096 && s.len() <= RECENT_BYTES {
                    self.seen.insert(s.to_owned(), v.clone());
                }
                v
            }
        }
    }
}

fn to_py(py: Python<'_>, v: &V, names: &mut Names<'_>) -> PyObject {
    match v {
        V::Null => py.None(),
        V::Bool(b) => PyBool::new_bound(py, *b).to_owned().into_any().unbind(),
        V::I(n) => n.into_py(py),
        V::U(n) => n.into_py(py),
        V::F(f, _) => f.into_py(py),
        V::S(s) => py_text(py, s).into_any().unbind(),
        V::A(items) => {
            let list = PyList::empty_bound(py);
            for item in items {
                let _ = list.append(to_py(py, item, names));
            }
            list.into_any().unbind()
        }
        V::O(items) => {
            let dict = dict_sized(py, items.len() as isize);
            for (k, item) in items {
                let _ = dict.set_item(names.key(k), to_py(py, item, names));
            }
            dict.into_any().unbind()
        }
    }
}

// ---- schema_version 3 ----

fn chars_within(s: &str, least: usize, most: usize) -> bool {
    // a code point count (msgspec's min_length/max_length), bytes first: most are ASCII
    if s.len() < least {
        return false;
    }
    let n = s.chars().count();
    least <= n && n <= most
}

/// `^[A-Z][A-Z0-9_]*$`
fn relation_type_ok(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b[0].is_ascii_uppercase()
        && b[1..].iter().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == b'_')
}

/// `^[a-z][a-z0-9_]{0,63}$`
fn type_name_ok(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && b[0].is_ascii_lowercase()
        && b[1..].iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_')
}

struct Rel<'a> {
    kind: Cow<'a, str>,
    target_type: Cow<'a, str>,
    target_id: Cow<'a, str>,
}

struct Env<'a> {
    tenant: Cow<'a, str>,
    entity_type: Cow<'a, str>,
    entity_id: Cow<'a, str>,
    revision: i64,
    occurred: Cow<'a, str>,
    priority: &'static str,
    attributes: V<'a>,
    relations: Vec<Rel<'a>>,
    deleted: bool,
}

fn relation(v: V<'_>) -> Option<Rel<'_>> {
    let items = match v {
        V::O(items) => items,
        _ => return None,
    };
    let (mut kind, mut target_type, mut target_id) = (None, None, None);
    for (k, v) in items {
        let s = match v {
            V::S(s) => s,
            _ => return None,
        };
        let slot = match &*k {
            "type" if relation_type_ok(&s) => &mut kind,
            "target_type" if type_name_ok(&s) => &mut target_type,
            "target_id" if chars_within(&s, 1, 256) => &mut target_id,
            _ => return None,
        };
        if slot.replace(s).is_some() {
            return None;
        }
    }
    Some(Rel { kind: kind?, target_type: target_type?, target_id: target_id? })
}

/// The envelope of a line, its members checked as they are read: a line that is not
/// schema_version 3 (its first member, as most senders write it) is left at once.
fn envelope_of(b: &[u8]) -> Option<Env<'_>> {
    let mut p = P { b, i: 0 };
    p.ws();
    if p.peek()? != b'{' {
        return None;
    }
    p.i += 1;
    let mut version = false;
    let (mut tenant, mut entity_type, mut entity_id, mut occurred) = (None, None, None, None);
    let (mut revision, mut priority, mut attributes) = (None, None, None);
    let (mut relations, mut deleted) = (None, None);
    loop {
        p.ws();
        if p.peek()? != b'"' {
            return None;
        }
        p.i += 1;
        let k = p.string()?;
        p.ws();
        if p.peek()? != b':' {
            return None;
        }
        p.i += 1;
        let v = p.value(1)?;
        let fresh = match (&*k, v) {
            ("schema_version", V::I(3)) => !std::mem::replace(&mut version, true),
            ("tenant_id", V::S(s)) => tenant.replace(s).is_none(),
            ("entity_type", V::S(s)) => entity_type.replace(s).is_none(),
            ("entity_id", V::S(s)) if chars_within(&s, 1, 256) => entity_id.replace(s).is_none(),
            ("revision", V::I(n)) if n >= 0 => revision.replace(n).is_none(),
            ("occurred_at", V::S(s)) => occurred.replace(s).is_none(),
            ("priority", V::S(s)) => {
                let p: &'static str = match &*s {
                    "high" => "high",
                    "normal" => "normal",
                    "low" => "low",
                    _ => return None,
                };
                priority.replace(p).is_none()
            }
            ("attributes", V::O(a)) => attributes.replace(V::O(a)).is_none(),
            ("relations", V::A(rs)) => {
                let mut out = Vec::with_capacity(rs.len());
                for r in rs {
                    out.push(relation(r)?);
                }
                relations.replace(out).is_none()
            }
            ("deleted", V::Bool(b)) => deleted.replace(b).is_none(),
            _ => return None,
        };
        if !fresh {
            return None;
        }
        p.ws();
        match p.peek()? {
            b',' => p.i += 1,
            b'}' => break,
            _ => return None,
        }
    }
    p.i += 1;
    p.ws();
    if p.i != b.len() || !version {
        return None;
    }
    Some(Env {
        tenant: tenant?,
        entity_type: entity_type?,
        entity_id: entity_id?,
        revision: revision?,
        occurred: occurred?,
        priority: priority.unwrap_or("normal"),
        attributes: attributes?,
        relations: relations.unwrap_or_default(),
        deleted: deleted.unwrap_or(false),
    })
}

/// The body's canonical bytes, keys in sorted order (as `decode.py` builds the body),
/// appended to `out` (a turn's lines share one buffer: no allocation a line), with where the
/// attributes' and the relations' JSON text sit in `out` (for `copy_row`, `sqlite_row`).
fn canonical(e: &Env, out: &mut Vec<u8>) -> Option<((usize, usize), (usize, usize))> {
    out.extend_from_slice(b"{\"attributes\":");
    let a0 = out.len();
    write(&e.attributes, out)?;
    let a1 = out.len();
    out.extend_from_slice(if e.deleted { b",\"deleted\":true" } else { b",\"deleted\":false" });
    out.extend_from_slice(b",\"entity_id\":");
    write_text(&e.entity_id, out);
    out.extend_from_slice(b",\"entity_type\":");
    write_text(&e.entity_type, out);
    out.extend_from_slice(b",\"occurred_at\":");
    write_text(&e.occurred, out);
    out.extend_from_slice(b",\"priority\":");
    write_str(e.priority, out);
    out.extend_from_slice(b",\"relations\":");
    let r0 = out.len();
    out.push(b'[');
    for (k, r) in e.relations.iter().enumerate() {
        if k > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"target_id\":");
        write_text(&r.target_id, out);
        out.extend_from_slice(b",\"target_type\":");
        write_text(&r.target_type, out);
        out.extend_from_slice(b",\"type\":");
        write_text(&r.kind, out);
        out.push(b'}');
    }
    out.push(b']');
    let r1 = out.len();
    out.extend_from_slice(b",\"revision\":");
    write_int(i128::from(e.revision), out);
    out.extend_from_slice(b",\"schema_version\":3,\"tenant_id\":");
    write_text(&e.tenant, out);
    out.push(b'}');
    Some(((a0, a1), (r0, r1)))
}

/// Microseconds since 2000-01-01 UTC of `YYYY-MM-DD(T|t)HH:MM:SS[.f+](Z|+HH:MM|-HH:MM)`, the
/// fraction cut after 6 digits as Python's `datetime.fromisoformat` cuts it, with how many
/// fraction digits were sent; None for any other spelling. Every form RFC 3339 has that
/// `Decoder._time_of` reads (the schema's `date-time` check, then `fromisoformat`): a
/// lowercase `z`, a space, a leap second are refused there, and left to Python here.
fn rfc3339_micros(s: &str) -> Option<(i64, usize)> {
    let b = s.as_bytes();
    let num = |from: usize, len: usize| -> Option<i64> {
        let mut n = 0i64;
        for &c in b.get(from..from + len)? {
            if !c.is_ascii_digit() {
                return None;
            }
            n = n * 10 + (c - b'0') as i64;
        }
        Some(n)
    };
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || (b[10] != b'T' && b[10] != b't')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let (y, mo, d) = (num(0, 4)?, num(5, 2)?, num(8, 2)?);
    let (h, mi, sec) = (num(11, 2)?, num(14, 2)?, num(17, 2)?);
    let leap = y % 4 == 0 && (y % 100 != 0 || y % 400 == 0);
    let month_days = [31, if leap { 29 } else { 28 }, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    if !(1..=9999).contains(&y) || !(1..=12).contains(&mo) || d < 1 || d > month_days[(mo - 1) as usize]
        || h > 23 || mi > 59 || sec > 59
    {
        return None;
    }
    let mut i = 19;
    let mut frac = 0i64;
    let mut sent = 0;
    if b[i] == b'.' {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        sent = i - start;
        if sent == 0 {
            return None;
        }
        let n = sent.min(6);
        frac = num(start, n)? * 10i64.pow((6 - n) as u32);
    }
    let offset = match b.get(i..)? {
        b"Z" => 0,
        rest if rest.len() == 6 && (rest[0] == b'+' || rest[0] == b'-') && rest[3] == b':' => {
            let (oh, om) = (num(i + 1, 2)?, num(i + 4, 2)?);
            if oh > 23 || om > 59 {
                return None;
            }
            let o = oh * 3600 + om * 60;
            if rest[0] == b'-' {
                -o
            } else {
                o
            }
        }
        _ => return None,
    };
    // days from 2000-01-01 (Howard Hinnant's days_from_civil, shifted)
    let yy = if mo <= 2 { y - 1 } else { y };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468 - 10957;
    let secs = days * 86400 + h * 3600 + mi * 60 + sec - offset;
    Some((secs * 1_000_000 + frac, sent))
}

/// `rfc3339_micros` with at most 6 fraction digits, the value `ingest/sinks/postgres.py`'s
/// `_when` gives; None for any other spelling (the sink then encodes the batch's rows in
/// Python; past 6 digits the server rounds where Python cuts, so `_when` gives none either).
fn micros_of(s: &str) -> Option<i64> {
    match rfc3339_micros(s)? {
        (us, sent) if sent <= 6 => Some(us),
        _ => None,
    }
}

/// Seconds since 1970 of a time `rfc3339_micros` reads, as Python's
/// `datetime.fromisoformat(s).timestamp()` gives them: the microseconds divided by 10**6,
/// correctly rounded (half to even), as Python's int true division rounds. One f64 division
/// is that while the microseconds are exact in an f64 (under 2**53: years ~1685-2255);
/// outside, the decimal text of the quotient read as an f64 is (Rust's `str::parse` rounds
/// correctly, half to even), ~0.1 µs, for the rare time out there.
fn unix_seconds(s: &str) -> Option<f64> {
    const FROM_1970_TO_2000_US: i64 = 946_684_800_000_000;
    const EXACT: i64 = 1 << 53;
    let us = rfc3339_micros(s)?.0 + FROM_1970_TO_2000_US;
    if -EXACT < us && us < EXACT {
        return Some(us as f64 / 1e6);
    }
    let sign = if us < 0 { "-" } else { "" };
    let abs = us.unsigned_abs();
    format!("{}{}.{:06}", sign, abs / 1_000_000, abs % 1_000_000).parse().ok()
}

/// `unix_seconds`, for the test that holds it equal to `Decoder._time_of`.
#[pyfunction]
fn occurred_unix_seconds(s: &str) -> Option<f64> {
    unix_seconds(s)
}

fn field(out: &mut Vec<u8>, data: &[u8]) {
    out.extend_from_slice(&(data.len() as i32).to_be_bytes());
    out.extend_from_slice(data);
}

/// The Postgres sink's row of this record in binary COPY format, its 9 fields (`COLUMNS` of
/// ingest/sinks/postgres.py) without the field count: text tenant, entity_type, entity_id;
/// int8 revision; bool deleted; timestamptz occurred_at; jsonb attributes and relations
/// (NULL when deleted; the canonical text: sorted keys, which jsonb stores as it stores any
/// order); bytea dedupe_key. None when `occurred_at` is not one `micros_of` reads.
fn copy_row(e: &Env, canon: &[u8], attrs: (usize, usize), rels: (usize, usize), digest: &[u8]) -> Option<Vec<u8>> {
    let when = micros_of(&e.occurred)?;
    let texts = e.tenant.len() + e.entity_type.len() + e.entity_id.len();
    let mut out = Vec::with_capacity(texts + (attrs.1 - attrs.0) + (rels.1 - rels.0) + 96);
    field(&mut out, e.tenant.as_bytes());
    field(&mut out, e.entity_type.as_bytes());
    field(&mut out, e.entity_id.as_bytes());
    field(&mut out, &e.revision.to_be_bytes());
    field(&mut out, &[e.deleted as u8]);
    field(&mut out, &when.to_be_bytes());
    if e.deleted {
        out.extend_from_slice(&(-1i32).to_be_bytes());
        out.extend_from_slice(&(-1i32).to_be_bytes());
    } else {
        for (a, b) in [attrs, rels] {
            out.extend_from_slice(&((b - a + 1) as i32).to_be_bytes());
            out.push(1); // jsonb's binary format version
            out.extend_from_slice(&canon[a..b]);
        }
    }
    field(&mut out, digest);
    Some(out)
}

/// The SQLite sink's row of this record without its last column (`SQLiteSink.row_of` with
/// updated_at left off, which the sink adds per batch): tenant, entity_type, entity_id,
/// revision, deleted (0/1), occurred_at, attributes' JSON text (None when deleted), relations'
/// JSON text, dedupe_key. The JSON texts are slices of the canonical bytes (sorted keys), which
/// `row_of` writes too (OPT_SORT_KEYS); the strings are the objects the `Record` holds.
#[allow(clippy::too_many_arguments)]
fn sqlite_row(
    py: Python<'_>,
    e: &Env,
    canon: &[u8],
    attrs: (usize, usize),
    rels: (usize, usize),
    names: [&Bound<'_, PyString>; 4],
    revision: &PyObject,
    digest: &Bound<'_, PyBytes>,
    no_relations: &Py<PyString>,
) -> PyObject {
    // SAFETY: `canonical` writes UTF-8 (the record's texts, ASCII punctuation and numbers),
    // and the attributes' and relations' bounds sit beside ASCII bytes it wrote
    let text = |(a, b): (usize, usize)| Some(unsafe { std::str::from_utf8_unchecked(&canon[a..b]) });
    let (Some(attributes), Some(relations)) = (text(attrs), text(rels)) else {
        return py.None();
    };
    let [tenant, entity_type, entity_id, occurred] = names;
    let attributes: PyObject =
        if e.deleted { py.None() } else { py_text(py, attributes).into_any().unbind() };
    let items: [PyObject; 9] = [
        tenant.clone().into_any().unbind(),
        entity_type.clone().into_any().unbind(),
        entity_id.clone().into_any().unbind(),
        revision.clone_ref(py),
        (e.deleted as i64).into_py(py),
        occurred.clone().into_any().unbind(),
        attributes,
        if relations == "[]" {
            no_relations.clone_ref(py).into_any()
        } else {
            py_text(py, relations).into_any().unbind()
        },
        digest.clone().into_any().unbind(),
    ];
    untrack(tuple_of(py, items)).into_any().unbind()
}

/// `copy_row`'s `occurred_at`, for the tests that hold it equal to the sink's `_when`.
#[pyfunction]
fn timestamptz_micros(s: &str) -> Option<i64> {
    micros_of(s)
}

struct Keys {
    attributes: Py<PyString>,
    deleted: Py<PyString>,
    entity_id: Py<PyString>,
    entity_type: Py<PyString>,
    occurred_at: Py<PyString>,
    priority: Py<PyString>,
    relations: Py<PyString>,
    revision: Py<PyString>,
    schema_version: Py<PyString>,
    tenant_id: Py<PyString>,
    kind: Py<PyString>,
    target_type: Py<PyString>,
    target_id: Py<PyString>,
    /// `sqlite_row`'s relations text of a record without relations (most records): one
    /// string a batch rather than one a record
    no_relations: Py<PyString>,
}

/// The canonical bytes of any JSON text as this module writes them (None: not handled);
/// for the tests that hold them equal to orjson's.
#[pyfunction]
fn canonical_json(py: Python<'_>, data: &[u8]) -> Option<PyObject> {
    let v = parse(data)?;
    let mut out = Vec::new();
    write(&v, &mut out)?;
    Some(PyBytes::new_bound(py, &out).into_any().unbind())
}

/// `^[a-z0-9][a-z0-9._-]{0,63}$`
fn tenant_ok(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b[1..].iter().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'_' | b'-')
        })
}

/// The known attributes' rules (attributes.properties), all but `email`'s format: false
/// hands the record to Python's checks.
fn attributes_ok(a: &V) -> bool {
    let items = match a {
        V::O(items) => items,
        _ => return false,
    };
    items.iter().all(|(k, v)| match &**k {
        "amount" => match v {
            V::I(n) => *n >= 0,
            V::U(_) => true,
            V::F(f, _) => *f >= 0.0,
            _ => false,
        },
        "currency" => match v {
            V::S(s) => s.len() == 3 && s.bytes().all(|c| c.is_ascii_uppercase()),
            _ => false,
        },
        "email" => false,
        "name" => match v {
            V::S(s) => s.len() <= 512 || s.chars().count() <= 512,
            _ => false,
        },
        "quantity" => matches!(v, V::I(n) if *n >= 0) || matches!(v, V::U(_)),
        "status" => matches!(v, V::S(_)),
        _ => true,
    })
}

/// What `decode_records` works out for one line without the GIL: the envelope, the canonical
/// bytes (with where the attributes' and relations' JSON sit in them), their SHA-256, the
/// An empty dict with room for `n` items: one built item by item from `PyDict_New` grows its
/// table twice on the way to the body's 10 keys (a new table and every key moved each time).
fn dict_sized(py: Python<'_>, n: isize) -> Bound<'_, PyDict> {
    // SAFETY: a new reference to a dict (or NULL with the error set, which `from_owned_ptr`
    // would not take: checked first)
    unsafe {
        let ptr = pyo3::ffi::_PyDict_NewPresized(n);
        if ptr.is_null() {
            return PyDict::new_bound(py);
        }
        Bound::from_owned_ptr(py, ptr).downcast_into_unchecked()
    }
}

/// A Python string of `s`: of an ASCII text, made at its size and copied (CPython's UTF-8
/// decoder would scan it again to find it ASCII); else decoded.
fn py_text<'py>(py: Python<'py>, s: &str) -> Bound<'py, PyString> {
    if s.is_ascii() {
        // SAFETY: PyUnicode_New(n, 127) is a new compact ASCII string of n bytes (NULL with
        // the error set: checked), whose data `PyUnicode_DATA` points at; `s` is n ASCII bytes
        unsafe {
            let ptr = pyo3::ffi::PyUnicode_New(s.len() as pyo3::ffi::Py_ssize_t, 127);
            if !ptr.is_null() {
                std::ptr::copy_nonoverlapping(s.as_ptr(), pyo3::ffi::PyUnicode_DATA(ptr).cast::<u8>(), s.len());
                return Bound::from_owned_ptr(py, ptr).downcast_into_unchecked();
            }
            pyo3::ffi::PyErr_Clear();
        }
    }
    PyString::new_bound(py, s)
}

/// A tuple that takes over `items`' references: `PyTuple::new_bound` adds one to each and
/// then drops the array's (pyo3's `register_decref`, ~50 instructions each, 20 a record).
fn tuple_of<const N: usize>(py: Python<'_>, items: [PyObject; N]) -> Bound<'_, PyTuple> {
    // SAFETY: PyTuple_New(N) is a new tuple of N empty slots; each slot is given a reference
    // it owns (into_ptr), exactly once. On NULL (no memory) the items are dropped normally.
    unsafe {
        let ptr = pyo3::ffi::PyTuple_New(N as pyo3::ffi::Py_ssize_t);
        if ptr.is_null() {
            return PyTuple::new_bound(py, items);
        }
        for (i, item) in items.into_iter().enumerate() {
            pyo3::ffi::PyTuple_SET_ITEM(ptr, i as pyo3::ffi::Py_ssize_t, item.into_ptr());
        }
        Bound::from_owned_ptr(py, ptr).downcast_into_unchecked()
    }
}

/// `callable(*items)`, by vectorcall when the callable takes it (a msgspec Struct type does):
/// no argument tuple is built and freed a record, as `call1` builds one. The items' references
/// are given back after the call.
fn call_with<'py, const N: usize>(
    py: Python<'py>,
    callable: &Bound<'py, PyAny>,
    items: [PyObject; N],
) -> PyResult<Bound<'py, PyAny>> {
    let ptrs: [*mut pyo3::ffi::PyObject; N] = items.map(|item| item.into_ptr());
    // SAFETY: `ptrs` are N owned, live references (given back below, exactly once each);
    // the result is a new reference or NULL with the error set (`from_owned_ptr_or_err`).
    unsafe {
        let result = pyo3::ffi::PyObject_Vectorcall(
            callable.as_ptr(),
            ptrs.as_ptr(),
            N,
            std::ptr::null_mut(),
        );
        for ptr in ptrs {
            pyo3::ffi::Py_DECREF(ptr);
        }
        Bound::from_owned_ptr_or_err(py, result)
    }
}

/// Out of the cycle collector's lists: a tuple of strings, numbers, bytes and None (what the
/// collector itself untracks, but only once a collection has walked it), or the relations
/// list, whose dicts hold strings only. A record's objects are never part of a cycle (the
/// reasoning of the `gc=False` Structs); each tracked one cost ~0.2 µs of generation-0
/// collections in the embedded pod, and an untracked list leaves the body dict untracked
/// too (CPython tracks a dict only once it holds a tracked object).
fn untrack<T>(obj: Bound<'_, T>) -> Bound<'_, T> {
    // SAFETY: a live object of a GC type (tuple, list); untracking an untracked one is a no-op
    unsafe { pyo3::ffi::PyObject_GC_UnTrack(obj.as_ptr().cast()) };
    obj
}

/// Whether a JSON value holds a list or an object below its top level: then the body keeps
/// its tracking (`to_py` built tracked containers below it).
fn nested(v: &V) -> bool {
    match v {
        V::O(items) => items.iter().any(|(_, item)| matches!(item, V::A(_) | V::O(_))),
        V::A(_) => true,
        _ => false,
    }
}

/// Postgres row when asked for, and whether the compiled rules hold (all but the route's tenant
/// and occurred_at's time, which need Python objects).
struct Line<'a> {
    env: Env<'a>,
    attrs: (usize, usize),
    rels: (usize, usize),
    digest: [u8; 32],
    row: Option<Vec<u8>>,
    rules: bool,
}

/// `canon`: the turn's buffer, to which the line's canonical bytes are appended (left as it
/// was when the line is not one the compiled path takes).
fn line_of<'a>(data: &'a [u8], rows: bool, canon: &mut Vec<u8>) -> Option<Line<'a>> {
    let env = envelope_of(data)?;
    let start = canon.len();
    let Some((attrs, rels)) = canonical(&env, canon) else {
        canon.truncate(start);
        return None;
    };
    let digest: [u8; 32] = Sha256::digest(&canon[start..]).into();
    let row = if rows { copy_row(&env, canon, attrs, rels, &digest) } else { None };
    let rules = tenant_ok(&env.tenant) && type_name_ok(&env.entity_type) && attributes_ok(&env.attributes);
    Some(Line { env, attrs, rels, digest, row, rules })
}

/// A raw record and its bytes when the compiled path may read them.
type Held<'py> = (Bound<'py, PyAny>, Option<Bound<'py, PyBytes>>);

/// Lines decoded a turn: each turn parses, checks, writes and hashes its lines with the GIL
/// released, then takes it back to build their Python objects. Releasing it lets a thread
/// that waits for it (a SQLite thread back from its file, holding that file's writer lock)
/// take it at once, instead of after the whole batch; a turn's lines stay in the CPU's cache
/// between the two halves (one turn for a 100k-record call cost ~0.5 µs a record more).
const TURN: usize = 256;

/// For each RawRecord: a finished `Record` when every rule the decoder checks holds (shape,
/// patterns, known attributes, tenant of the route, occurred_at already in `times` or read
/// here, and not past `horizon`), built without its body (None: `Record.body` builds it from
/// the bytes when read) unless `bodies` asks for it; the tuple
/// (body, dedupe_key, tenant, entity_type, entity_id, revision, occurred_at, deleted, priority,
/// attributes) when only the Python-side rules are left to
/// check; None when Python decodes it.
/// `rows`: also write each record's Postgres row (`copy_row`); else None. `sqlite_rows`: also
/// build each record's SQLite sink row (`sqlite_row`); else None. Both come last, in that order.
///
/// The lines' bytes are taken first (GIL held), then decoded `TURN` lines at a time: parsed,
/// checked, written canonically and hashed with the GIL released (other threads run Python
/// meanwhile), then their Python objects built with it.
///
/// `facts`: answer `(list, facts)` instead, where facts is None unless every answer is a
/// finished `Record`; then `(keys, entities, unique, tenant, entity_type, source,
/// event_time)`: the records' dedupe keys in order (a new list), the set of their entity
/// keys, whether no dedupe key comes twice, the tenant and the entity type every record
/// shares (None when they differ), and the raws' `source` and `event_time` when every raw
/// holds the very same object (None otherwise, also when they are only equal: a source
/// gives each raw of a batch its one name and its one time). The worker's per-batch
/// bookkeeping reads these instead of walking the records again on the event loop
/// (`ingest.pipeline.decode.BatchFacts`).
///
/// `bodies`: which finished records get their body built at once, as the tuples' is: None or
/// False, none; True, all; else a callable `(tenant, entity_type) -> bool`, asked once a call
/// per pair (a route whose sinks read bodies: Typesense, Neo4j). Built here it costs about
/// half of `Record.body`'s rebuild from the bytes.
#[pyfunction]
#[pyo3(signature = (raws, record, times, horizon, limit, rows=true, sqlite_rows=false, facts=false, bodies=None))]
#[allow(clippy::too_many_arguments)]
fn decode_records(
    py: Python<'_>,
    raws: &Bound<'_, PyList>,
    record: &Bound<'_, PyAny>,
    times: &Bound<'_, PyDict>,
    horizon: f64,
    limit: usize,
    rows: bool,
    sqlite_rows: bool,
    facts: bool,
    bodies: Option<&Bound<'_, PyAny>>,
) -> PyResult<PyObject> {
    let mut bodies = Bodies::of(bodies)?;
    let k = |s: &str| PyString::intern_bound(py, s).unbind();
    let keys = Keys {
        attributes: k("attributes"),
        deleted: k("deleted"),
        entity_id: k("entity_id"),
        entity_type: k("entity_type"),
        occurred_at: k("occurred_at"),
        priority: k("priority"),
        relations: k("relations"),
        revision: k("revision"),
        schema_version: k("schema_version"),
        tenant_id: k("tenant_id"),
        kind: k("type"),
        target_type: k("target_type"),
        target_id: k("target_id"),
        no_relations: k("[]"),
    };
    let mut fields = Fields::new(py, ["data", "decoded", "meta", "tenant", "source", "event_time"]);
    // 1. the raws and their bytes, held (strong references) until the end
    let mut held: Vec<Held<'_>> = Vec::with_capacity(raws.len());
    for raw in raws.iter() {
        let data = match fields.get(&raw, DATA)?.downcast_into::<PyBytes>().ok() {
            Some(b) if b.as_bytes().len() <= limit
                && fields.get(&raw, DECODED)?.is_none()
                && !fields.get(&raw, META)?.is_truthy()? => Some(b),
            _ => None,
        };
        held.push((raw, data));
    }
    let slices: Vec<Option<&[u8]>> = held.iter().map(|(_, b)| b.as_ref().map(|b| b.as_bytes())).collect();
    let mut names = Names { py, seen: std::collections::HashMap::default(), recent: Default::default(), next: 0 };
    let out = PyList::empty_bound(py);
    let mut acc = if facts { Some(Facts::new(py, held.len())) } else { None };
    // a turn's lines and their canonical bytes, in buffers kept from turn to turn
    let mut lines: Vec<Option<Line<'_>>> = Vec::with_capacity(TURN);
    let mut canon: Vec<u8> = Vec::with_capacity(TURN * 256);
    for (turn, raws) in slices.chunks(TURN).zip(held.chunks(TURN)) {
        // 2. the Rust part, without the GIL: `bytes` objects are immutable and held above
        canon.clear();
        lines.clear();
        py.allow_threads(|| lines.extend(turn.iter().map(|d| d.and_then(|d| line_of(d, rows, &mut canon)))));
        // 3. their Python objects
        for ((raw, _), line) in raws.iter().zip(lines.iter()) {
            build(py, &out, raw, line.as_ref(), &canon, record, times, horizon, sqlite_rows, &keys, &mut names, &mut fields, &mut acc, &mut bodies)?;
        }
    }
    Ok(match acc {
        None => out.into_any().unbind(),
        Some(acc) => tuple_of(py, [out.into_any().unbind(), acc.finish(py)?]).into_any().unbind(),
    })
}

/// The raw records' fields `decode_records` reads, by their index in `Fields::new`'s names.
const DATA: usize = 0;
const DECODED: usize = 1;
const META: usize = 2;
const TENANT: usize = 3;
const SOURCE: usize = 4;
const EVENT_TIME: usize = 5;

/// Reads the raw records' fields. A `RawRecord` (a msgspec Struct) keeps each field in a slot
/// at a fixed offset, which its type's member descriptor gives: read there, a field costs a
/// load instead of `getattr`'s type lookup and descriptor call (those were ~8 % of the decode
/// thread's time in a pod's profile, six reads a record). An object of any other type, a
/// name that is not such a slot in its type, or a slot not set: `getattr`, as before.
struct Fields<'py> {
    names: [Py<PyString>; 6],
    /// the type the offsets are for, held (None: no type yet)
    ty: Option<Bound<'py, PyAny>>,
    /// each name's slot offset in `ty`'s objects; 0: read by `getattr`
    offsets: [isize; 6],
}

impl<'py> Fields<'py> {
    fn new(py: Python<'py>, names: [&str; 6]) -> Self {
        Fields { names: names.map(|n| PyString::intern_bound(py, n).unbind()), ty: None, offsets: [0; 6] }
    }

    /// Field `i` of `raw`.
    fn get(&mut self, raw: &Bound<'py, PyAny>, i: usize) -> PyResult<Bound<'py, PyAny>> {
        let ty = raw.get_type().into_any();
        if !self.ty.as_ref().map_or(false, |t| t.is(&ty)) {
            self.offsets = [0; 6];
            for (name, offset) in self.names.iter().zip(self.offsets.iter_mut()) {
                *offset = ty.getattr(name).map_or(0, |d| slot_offset(&d));
            }
            self.ty = Some(ty);
        }
        let offset = self.offsets[i];
        if offset > 0 {
            // SAFETY: `raw`'s type is `ty`, whose member descriptor says an object pointer
            // (Py_T_OBJECT_EX) sits at `offset` in each of its objects; NULL when not set.
            unsafe {
                let slot = *raw.as_ptr().cast::<u8>().offset(offset).cast::<*mut pyo3::ffi::PyObject>();
                if !slot.is_null() {
                    return Ok(Bound::from_borrowed_ptr(raw.py(), slot));
                }
            }
        }
        raw.getattr(&self.names[i])
    }
}

/// The offset of the object slot a type's attribute `descr` reads (a member descriptor of
/// kind Py_T_OBJECT_EX, as `__slots__` and msgspec Structs make), else 0.
fn slot_offset(descr: &Bound<'_, PyAny>) -> isize {
    // SAFETY: the descriptor's type is checked before it is read as a member descriptor
    unsafe {
        let ptr = descr.as_ptr();
        if pyo3::ffi::Py_TYPE(ptr) != std::ptr::addr_of_mut!(pyo3::ffi::PyMemberDescr_Type) {
            return 0;
        }
        let member = (*ptr.cast::<pyo3::ffi::PyMemberDescrObject>()).d_member.cast::<pyo3::ffi::PyMemberDef>();
        if member.is_null() || (*member).type_code != pyo3::ffi::Py_T_OBJECT_EX {
            return 0;
        }
        (*member).offset
    }
}

/// `decode_records`' `bodies`: which finished records carry their body.
enum Bodies<'py> {
    None,
    All,
    /// the callable, and its answers so far by (tenant, entity_type)
    Asked(Bound<'py, PyAny>, std::collections::HashMap<(String, String), bool, Fnv>),
}

impl<'py> Bodies<'py> {
    fn of(given: Option<&Bound<'py, PyAny>>) -> PyResult<Self> {
        Ok(match given {
            None => Bodies::None,
            Some(b) if b.is_none() => Bodies::None,
            Some(b) if b.downcast::<PyBool>().is_ok() => {
                if b.is_truthy()? { Bodies::All } else { Bodies::None }
            }
            Some(b) => Bodies::Asked(b.clone(), std::collections::HashMap::default()),
        })
    }

    fn wanted(&mut self, tenant: &Bound<'py, PyString>, entity_type: &Bound<'py, PyString>, env: &Env) -> PyResult<bool> {
        match self {
            Bodies::None => Ok(false),
            Bodies::All => Ok(true),
            Bodies::Asked(ask, seen) => {
                let pair = (env.tenant.to_string(), env.entity_type.to_string());
                if let Some(&yes) = seen.get(&pair) {
                    return Ok(yes);
                }
                let yes = ask.call1((tenant, entity_type))?.is_truthy()?;
                seen.insert(pair, yes);
                Ok(yes)
            }
        }
    }
}

/// A `u64` of SHA-256 output as its own hash: the set of `Facts::digests` needs no mixing.
#[derive(Default, Clone, Copy)]
struct First8(u64);

impl std::hash::Hasher for First8 {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

impl std::hash::BuildHasher for First8 {
    type Hasher = First8;
    fn build_hasher(&self) -> First8 {
        First8(0)
    }
}

/// `decode_records`' batch facts, gathered while its records are built (their objects are
/// in the CPU's cache then; the event loop's passes over a batch each missed it per record).
struct Facts<'py> {
    done: bool,
    keys: Bound<'py, PyList>,
    entities: Bound<'py, PySet>,
    /// the digests' first 8 bytes (uniform: SHA-256): two equal digests are always found; two
    /// that only share those bytes (~n²/2^64) say "not unique", which costs the worker its
    /// per-record pass over the keys, never a wrong answer
    digests: std::collections::HashSet<u64, First8>,
    unique: bool,
    tenant: Option<(String, Bound<'py, PyString>)>,
    entity_type: Option<(String, Bound<'py, PyString>)>,
    mixed_tenants: bool,
    mixed_types: bool,
    /// the raws' `source` and `event_time`, while every raw so far held the same object
    same: [Option<Bound<'py, PyAny>>; 2],
    mixed_same: [bool; 2],
}

impl<'py> Facts<'py> {
    fn new(py: Python<'py>, n: usize) -> Self {
        let mut digests = std::collections::HashSet::with_hasher(First8::default());
        digests.reserve(n);
        Facts {
            done: true,
            keys: PyList::empty_bound(py),
            entities: PySet::empty_bound(py).expect("a new set"),
            digests,
            unique: true,
            tenant: None,
            entity_type: None,
            mixed_tenants: false,
            mixed_types: false,
            same: [None, None],
            mixed_same: [false, false],
        }
    }

    /// A finished record's raw: is its `source` / `event_time` the object the first one had?
    /// Read only while the batch's raws all had the same so far.
    fn same_as_first(&mut self, raw: &Bound<'py, PyAny>, fields: &mut Fields<'py>) -> PyResult<()> {
        for ((field, seen), mixed) in [SOURCE, EVENT_TIME].into_iter().zip(self.same.iter_mut()).zip(self.mixed_same.iter_mut()) {
            if *mixed {
                continue;
            }
            let value = fields.get(raw, field)?;
            match seen {
                None => *seen = Some(value),
                Some(first) if !first.is(&value) => *mixed = true,
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// A finished record: its key, entity key, tenant and entity type.
    fn add(
        &mut self,
        digest: &[u8; 32],
        key: &Bound<'py, PyBytes>,
        entity_key: &Bound<'py, PyTuple>,
        tenant: (&str, &Bound<'py, PyString>),
        entity_type: (&str, &Bound<'py, PyString>),
    ) -> PyResult<()> {
        if !self.done {
            return Ok(());
        }
        self.keys.append(key)?;
        self.entities.add(entity_key)?;
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        if !self.digests.insert(u64::from_ne_bytes(first)) {
            self.unique = false;
        }
        for ((text, obj), seen, mixed) in [
            (tenant, &mut self.tenant, &mut self.mixed_tenants),
            (entity_type, &mut self.entity_type, &mut self.mixed_types),
        ] {
            match seen {
                None => *seen = Some((text.to_owned(), obj.clone())),
                // the batch's name cache gives one object a text: most are the same object
                Some((first, seen)) if !seen.is(obj) && first != text => *mixed = true,
                Some(_) => {}
            }
        }
        Ok(())
    }

    fn finish(self, py: Python<'py>) -> PyResult<PyObject> {
        if !self.done {
            return Ok(py.None());
        }
        let one = |seen: Option<(String, Bound<'py, PyString>)>, mixed: bool| -> PyObject {
            match seen {
                Some((_, obj)) if !mixed => obj.into_any().unbind(),
                _ => py.None(),
            }
        };
        let [source, event_time] = self.same;
        let [mixed_sources, mixed_times] = self.mixed_same;
        let same = |seen: Option<Bound<'py, PyAny>>, mixed: bool| -> PyObject {
            match seen {
                Some(obj) if !mixed => obj.unbind(),
                _ => py.None(),
            }
        };
        let items: [PyObject; 7] = [
            self.keys.into_any().unbind(),
            self.entities.into_any().unbind(),
            PyBool::new_bound(py, self.unique).to_owned().into_any().unbind(),
            one(self.tenant, self.mixed_tenants),
            one(self.entity_type, self.mixed_types),
            same(source, mixed_sources),
            same(event_time, mixed_times),
        ];
        Ok(tuple_of(py, items).into_any().unbind())
    }
}

/// `decode_records`' answer for one raw record (see there), appended to `out`.
#[allow(clippy::too_many_arguments)]
fn build<'py>(
    py: Python<'py>,
    out: &Bound<'py, PyList>,
    raw: &Bound<'py, PyAny>,
    line: Option<&Line<'_>>,
    canon: &[u8],
    record: &Bound<'py, PyAny>,
    times: &Bound<'py, PyDict>,
    horizon: f64,
    sqlite_rows: bool,
    keys: &Keys,
    names: &mut Names<'py>,
    fields: &mut Fields<'py>,
    facts: &mut Option<Facts<'py>>,
    bodies: &mut Bodies<'py>,
) -> PyResult<()> {
    // read where the turn's vector holds it (a `Line` is ~370 bytes: not moved again)
    let Line { env, attrs, rels, digest, row, rules } = match line {
        Some(line) => line,
        None => {
            if let Some(f) = facts.as_mut() {
                f.done = false;
            }
            return out.append(py.None());
        }
    };
    let (attrs, rels, rules) = (*attrs, *rels, *rules);
    let route = fields.get(raw, TENANT)?;
    let mut done = rules
        && route.downcast::<PyString>().map_or(false, |t| t.to_str().map_or(false, |t| t == env.tenant));
    let tenant = names.get(&env.tenant);
    let entity_type = names.get(&env.entity_type);
    let entity_id = py_text(py, &env.entity_id);
    let occurred = py_text(py, &env.occurred);
    if done {
        // every time `Decoder._time_of` reads is read here as it reads it (same µs, same
        // correctly rounded division), before `times` is asked: a real feed's times are mostly
        // distinct, and a miss there cost a hash of the new string, a lookup, and the batch's
        // facts; what is left (times Python refuses) is `times`' answer or Python's
        done = match unix_seconds(&env.occurred) {
            Some(when) => when <= horizon,
            None => match times.get_item(&occurred)? {
                Some(when) => when.extract::<f64>()? <= horizon,
                None => false,
            },
        };
    }
    let priority = names.get(env.priority);
    let revision = env.revision.into_py(py);
    let deleted = PyBool::new_bound(py, env.deleted).to_owned();
    let row: PyObject = match row {
        Some(row) => PyBytes::new_bound(py, &row).into_any().unbind(),
        None => py.None(),
    };
    let key = PyBytes::new_bound(py, digest);
    let lite: PyObject = if sqlite_rows {
        sqlite_row(py, &env, canon, attrs, rels, [&tenant, &entity_type, &entity_id, &occurred], &revision, &key, &keys.no_relations)
    } else {
        py.None()
    };
    if done {
        // No body unless asked: `Record.body` builds it from the record's bytes when something
        // reads it (no sink of the SQLite or Postgres path does: they take the rows above).
        // Building it here and freeing it on the event loop cost ~1 µs a record.
        let body: PyObject = if bodies.wanted(&tenant, &entity_type, &env)? {
            let parts = [&tenant, &entity_type, &entity_id, &occurred, &priority];
            body_dict(py, &env, keys, names, parts, &revision, &deleted)?.0.into_any().unbind()
        } else {
            py.None()
        };
        let entity_key = untrack(tuple_of(
            py,
            [tenant.clone().into_any().unbind(), entity_type.clone().into_any().unbind(), entity_id.clone().into_any().unbind()],
        ));
        if let Some(f) = facts.as_mut() {
            f.add(&digest, &key, &entity_key, (&env.tenant, &tenant), (&env.entity_type, &entity_type))?;
            f.same_as_first(raw, fields)?;
        }
        let args: [PyObject; 12] = [
            raw.clone().unbind(),
            body,
            key.into_any().unbind(),
            tenant.into_any().unbind(),
            entity_type.into_any().unbind(),
            entity_id.into_any().unbind(),
            revision,
            entity_key.into_any().unbind(),
            deleted.into_any().unbind(),
            priority.into_any().unbind(),
            row,
            lite,
        ];
        return out.append(call_with(py, record, args)?);
    }
    if let Some(f) = facts.as_mut() {
        f.done = false;
    }
    let parts = [&tenant, &entity_type, &entity_id, &occurred, &priority];
    let (body, attributes) = body_dict(py, &env, keys, names, parts, &revision, &deleted)?;
    let items: [PyObject; 12] = [
        body.into_any().unbind(),
        key.into_any().unbind(),
        tenant.into_any().unbind(),
        entity_type.into_any().unbind(),
        entity_id.into_any().unbind(),
        revision,
        occurred.into_any().unbind(),
        deleted.into_any().unbind(),
        priority.into_any().unbind(),
        attributes,
        row,
        lite,
    ];
    out.append(tuple_of(py, items))?;
    Ok(())
}

/// A record's body as `decode.py`'s Python path builds it (top-level keys sorted, defaults
/// filled, relation keys `type`, `target_type`, `target_id`), of the objects the record holds;
/// with its attributes dict.
#[allow(clippy::too_many_arguments)]
fn body_dict<'py>(
    py: Python<'py>,
    env: &Env,
    keys: &Keys,
    names: &mut Names<'py>,
    [tenant, entity_type, entity_id, occurred, priority]: [&Bound<'py, PyString>; 5],
    revision: &PyObject,
    deleted: &Bound<'py, PyBool>,
) -> PyResult<(Bound<'py, PyDict>, PyObject)> {
    let attributes = to_py(py, &env.attributes, names);
    let relations = PyList::empty_bound(py);
    for r in &env.relations {
        let d = PyDict::new_bound(py);
        d.set_item(&keys.kind, names.key(&r.kind))?;
        d.set_item(&keys.target_type, names.key(&r.target_type))?;
        d.set_item(&keys.target_id, py_text(py, &r.target_id))?;
        relations.append(d)?;
    }
    let relations = untrack(relations);
    let body = dict_sized(py, 10);
    body.set_item(&keys.attributes, &attributes)?;
    body.set_item(&keys.deleted, deleted)?;
    body.set_item(&keys.entity_id, entity_id)?;
    body.set_item(&keys.entity_type, entity_type)?;
    body.set_item(&keys.occurred_at, occurred)?;
    body.set_item(&keys.priority, priority)?;
    body.set_item(&keys.relations, relations)?;
    body.set_item(&keys.revision, revision)?;
    body.set_item(&keys.schema_version, 3)?;
    body.set_item(&keys.tenant_id, tenant)?;
    // a dict holding any list or dict is tracked; a record's body is never part of a cycle,
    // and CPython tracks a dict again by itself when a tracked object is put in it
    let body = if nested(&env.attributes) { body } else { untrack(body) };
    Ok((body, attributes))
}

#[pymodule]
fn ingest_native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(decode_records, m)?)?;
    m.add_function(wrap_pyfunction!(canonical_json, m)?)?;
    m.add_function(wrap_pyfunction!(timestamptz_micros, m)?)?;
    m.add_function(wrap_pyfunction!(occurred_unix_seconds, m)?)?;
    m.add_function(wrap_pyfunction!(flock::flock_wait, m)?)?;
    m.add_function(wrap_pyfunction!(bloom_block::bloom_block_add, m)?)?;
    m.add_function(wrap_pyfunction!(bloom_block::bloom_block_maybe, m)?)?;
    m.add_function(wrap_pyfunction!(claims::keys_may_meet, m)?)?;
    m.add_function(wrap_pyfunction!(claims::key_blob, m)?)?;
    m.add("SCHEMA_SHA256", SCHEMA_SHA256)?;
    Ok(())
}
