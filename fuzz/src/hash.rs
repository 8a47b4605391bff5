//! The password hash parser (`StoredHash::parse`), one format at a time, the input
//! spelled in that format's alphabet so that its parameter fields are reached.
//!
//! Input: one selector byte (bits 0-2: the format, bit 6: free or templated spelling,
//! bit 7: also verify when that is cheap), then the bytes that spell the hash. Free: each
//! byte picks a character of the format's alphabet (with `$` and the parameters'
//! punctuation), after the format's prefix. Templated: the format's fields in order,
//! numbers taken from the input (around the limits tcpsplice enforces), the rest spelled.
//!
//! Checked: no panic in parsing; an accepted hash is of the scheme its prefix names and
//! passes the cost limits by the harness's own reading of its parameters (yescrypt
//! memory at most 1 GiB; argon2id, as its verifier reads it, m >= 7168 KiB, m*t >= 35840,
//! at most 1 GiB; bcrypt cost 10 to 31; sha-crypt rounds >= 5000). Verification runs only
//! when that reading says it costs under a millisecond or so (yescrypt of 256 KiB of
//! passes, sha-crypt of 5000 rounds): the library is never asked for gigabytes or hours,
//! and the fuzzer keeps its pace. Not verified: argon2id, whose weakest accepted hash
//! takes over 10 ms, and bcrypt (cost 10: 50 ms), which is instead parsed as
//! `bcrypt::verify` parses it.

use tcpsplice::auth::password::{Scheme, StoredHash};

use crate::bytes::{spell, Bytes};

/// (ye)scrypt's and crypt's base64 alphabet.
pub const ITOA64: &[u8] = b"./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
/// bcrypt's base64 alphabet.
const BCRYPT64: &[u8] = b"./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
/// The PHC strings' base64 alphabet (without padding).
const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

const PREFIXES: [&str; 5] = ["$y$", "$argon2id$", "$2b$", "$5$", "$6$"];

/// The 1 GiB that no stored hash may make a login allocate.
const GIB: u128 = 1 << 30;

fn with(alphabet: &[u8], extra: &[u8]) -> Vec<u8> {
    [alphabet, extra].concat()
}

/// A number near the limits that matter, or any.
fn number(r: &mut Bytes) -> u64 {
    const NEAR: [u64; 16] = [
        0,
        1,
        4,
        5,
        9,
        10,
        31,
        32,
        4999,
        5000,
        7167,
        7168,
        8192,
        35840,
        1 << 20,
        999_999_999,
    ];
    match r.below(6) {
        0 => NEAR[r.below(NEAR.len())],
        1 => NEAR[r.below(NEAR.len())].wrapping_add(u64::from(r.u8())),
        2 => u64::from(r.u8()),
        3 => u64::from(r.u16()),
        4 => u64::from(r.u32()),
        _ => r.u64(),
    }
}

/// The text of a hash in format `format` (index into PREFIXES).
pub fn spell_hash(format: usize, templated: bool, data: &[u8]) -> String {
    let prefix = PREFIXES[format];
    if !templated {
        let alphabet = match format {
            0 => with(ITOA64, b"$"),
            1 => with(B64, b"$=,"),
            2 => with(BCRYPT64, b"$"),
            _ => with(ITOA64, b"$="),
        };
        return format!("{prefix}{}", spell(data, &alphabet));
    }
    let mut r = Bytes::new(data);
    match format {
        0 => {
            let n = 1 + r.below(9);
            let params = r.spell(n, ITOA64);
            let salt_len = r.below(32);
            let salt = r.spell(salt_len, ITOA64);
            let hash = r.spell(43, ITOA64);
            format!("$y${params}${salt}${hash}")
        }
        1 => {
            let mut s = String::from(prefix);
            match r.below(4) {
                0 => {}
                1 => s.push_str(&format!("v={}$", number(&mut r))),
                _ => s.push_str("v=19$"),
            }
            let (m, t, p) = (number(&mut r), number(&mut r), number(&mut r));
            s.push_str(&match r.below(4) {
                0 => format!("t={t},m={m},p={p}"),
                1 => format!("m={m},t={t}"),
                _ => format!("m={m},t={t},p={p}"),
            });
            let salt_len = r.below(40);
            let salt = r.spell(salt_len, B64);
            let hash_len = r.below(70);
            let hash = r.spell(hash_len, B64);
            format!("{s}${salt}${hash}")
        }
        2 => {
            let variant = ["2a", "2b", "2y", "2x"][r.below(4)];
            let cost = match r.below(3) {
                0 => r.spell(2, b"0123456789+- "),
                _ => format!("{:02}", number(&mut r) % 100),
            };
            let len = if r.below(8) == 0 { r.below(64) } else { 53 };
            let rest = r.spell(len, BCRYPT64);
            format!("${variant}${cost}${rest}")
        }
        _ => {
            let mut s = String::from(prefix);
            match r.below(3) {
                0 => {}
                1 => s.push_str(&format!("rounds={}$", number(&mut r))),
                _ => {
                    let n = r.below(12);
                    s.push_str(&format!("rounds={}$", r.spell(n, b"0123456789+-")));
                }
            }
            let salt_len = r.below(20);
            let salt = r.spell(salt_len, ITOA64);
            let hash_len = if format == 3 { 43 } else { 86 };
            let hash = r.spell(hash_len, ITOA64);
            format!("{s}{salt}${hash}")
        }
    }
}

/// yescrypt's variable-width base64 number (decode64_uint32 of the reference code):
/// the value and where the next field starts.
fn yescrypt_number(s: &[u8], at: usize, min: u64) -> Option<(u64, usize)> {
    let digit = |c: u8| ITOA64.iter().position(|&a| a == c).map(|d| d as u64);
    let first = digit(*s.get(at)?)?;
    let (mut start, mut end, mut chars, mut bits) = (0u64, 47u64, 1u32, 0u32);
    let mut value = min;
    while first > end {
        value += (end + 1 - start) << bits;
        start = end + 1;
        end = start + (62 - end) / 2;
        chars += 1;
        bits += 6;
    }
    value += (first - start) << bits;
    let mut at = at + 1;
    while chars > 1 {
        chars -= 1;
        bits = bits.checked_sub(6)?;
        value += digit(*s.get(at)?)? << bits;
        at += 1;
    }
    Some((value, at))
}

/// yescrypt's N, r, p and t from the parameter field (`j9T` and the optional fields).
pub fn yescrypt_params(field: &str) -> Option<(u128, u64, u64, u64)> {
    let s = field.as_bytes();
    let (_flavor, at) = yescrypt_number(s, 0, 0)?;
    let (nlog2, at) = yescrypt_number(s, at, 1)?;
    let (r, mut at) = yescrypt_number(s, at, 1)?;
    let (mut p, mut t) = (1, 0);
    if at < s.len() {
        let (have, next) = yescrypt_number(s, at, 1)?;
        at = next;
        if have & 1 != 0 {
            (p, at) = yescrypt_number(s, at, 2)?;
        }
        if have & 2 != 0 {
            (t, _) = yescrypt_number(s, at, 1)?;
        }
    }
    if nlog2 > 127 {
        return None;
    }
    Some((1u128 << nlog2, r, p, t))
}

/// argon2id's m and t as the verifier uses them: from the parameter field after the
/// optional version, a repeated one its last value, an absent one the library's default
/// (m=19456 KiB, t=2: argon2 0.6 reads them so).
fn argon2_params(text: &str) -> Option<(u64, u64)> {
    let (mut m, mut t) = (19456, 2);
    let field = text
        .split('$')
        .skip(2)
        .find(|f| !f.starts_with("v="))
        .filter(|f| f.contains('='));
    for kv in field.into_iter().flat_map(|f| f.split(',')) {
        let (k, v) = kv.split_once('=')?;
        match k {
            "m" => m = v.parse().ok()?,
            "t" => t = v.parse().ok()?,
            _ => {}
        }
    }
    Some((m, t))
}

/// sha-crypt's rounds: the `rounds=N$` field, 5000 without one.
fn sha_rounds(text: &str) -> Option<u64> {
    match text[3..].strip_prefix("rounds=") {
        None => Some(5000),
        Some(rest) => {
            let n = rest.split('$').next()?;
            n.strip_prefix('+').unwrap_or(n).parse().ok()
        }
    }
}

/// What an accepted hash must be, by the harness's own reading; true when verifying it
/// is cheap (a few milliseconds).
pub fn check_accepted(text: &str, h: &StoredHash) -> bool {
    assert_eq!(h.as_str(), text);
    let named = match h.scheme {
        Scheme::Yescrypt => text.starts_with("$y$"),
        Scheme::Argon2id => text.starts_with("$argon2id$"),
        Scheme::Bcrypt => ["$2a$", "$2b$", "$2y$"].iter().any(|p| text.starts_with(p)),
        Scheme::ShaCrypt => text.starts_with("$5$") || text.starts_with("$6$"),
    };
    assert!(named, "{text:?} accepted as {:?}", h.scheme);
    match h.scheme {
        Scheme::Yescrypt => {
            let field = text.split('$').nth(2).unwrap_or("");
            let (n, r, p, t) = yescrypt_params(field)
                .unwrap_or_else(|| panic!("accepted yescrypt parameters {field:?} do not decode"));
            let memory = n.saturating_mul(128 * u128::from(r));
            assert!(
                memory <= GIB,
                "accepted yescrypt {field:?}: N={n} r={r}, {memory} bytes"
            );
            // Each of p lanes passes over the memory t + 1 times.
            memory * u128::from(p) * (u128::from(t) + 1) <= 256 << 10
        }
        Scheme::Argon2id => {
            let (m, t) = argon2_params(text)
                .unwrap_or_else(|| panic!("accepted argon2id {text:?}: parameters unreadable"));
            let mt = u128::from(m) * u128::from(t);
            assert!(
                m >= 7168 && mt >= 35840,
                "accepted weak argon2id m={m} t={t}"
            );
            assert!(u128::from(m) * 1024 <= GIB, "accepted argon2id m={m} KiB");
            // Even the weakest accepted (35 MiB of passes) takes over 10 ms.
            false
        }
        Scheme::Bcrypt => {
            let cost = text.get(4..6).expect("an accepted bcrypt hash has a cost");
            assert!(
                cost.bytes().all(|b| b.is_ascii_digit()),
                "accepted bcrypt cost {cost:?}"
            );
            let cost: u32 = cost.parse().unwrap();
            assert!((10..=31).contains(&cost), "accepted bcrypt cost {cost}");
            assert_eq!(text.len(), 60);
            // What bcrypt::verify does before its cost: must not panic.
            let _ = text.parse::<bcrypt::HashParts>();
            false
        }
        Scheme::ShaCrypt => {
            let rounds =
                sha_rounds(text).unwrap_or_else(|| panic!("accepted sha-crypt {text:?}: rounds"));
            assert!(rounds >= 5000, "accepted sha-crypt rounds={rounds}");
            // 5000 rounds: under a millisecond for $5$, about one for $6$.
            rounds <= 5000
        }
    }
}

pub fn run(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let format = usize::from(sel & 7) % PREFIXES.len();
    let text = spell_hash(format, sel & 0x40 != 0, rest);
    match StoredHash::parse(&text) {
        Ok(h) => {
            let cheap = check_accepted(&text, &h);
            if cheap && sel & 0x80 != 0 {
                let _ = h.verify(b"password");
            }
        }
        Err(why) => assert!(!why.is_empty()),
    }
}
