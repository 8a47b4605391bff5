//! Password hashes: which formats the users file may hold, checking a password against
//! one, making a new one (`tcpsplice-auth -H`), and a buffer that forgets its secret.
//!
//! Accepted: yescrypt (`$y$`, what `mkpasswd -m yescrypt` and Debian's shadow make),
//! argon2id (`$argon2id$`), bcrypt (`$2a$ $2b$ $2y$`, cost 10 or more; `htpasswd -B`
//! defaults to 5, so it needs `-C 12`), sha-crypt (`$5$ $6$`, 5000 rounds or more: 5000
//! is the default of glibc, mkpasswd and openssl, so their plain output is accepted).
//! Everything else is refused when the file is loaded: md5crypt (`$1$`, `$apr1$`), DES,
//! `{SHA}`, plain text, and formats we cannot verify.
//!
//! Costs have a ceiling too: a hash whose check would need more than [`MAX_MEMORY`] or
//! take longer than [`MAX_NANOS`] is refused at load. The time is estimated from the
//! parameters ([`Work`]), not measured, so a file loads or not the same on every machine.

use std::fmt;

use zeroize::Zeroize;

/// Minimum bcrypt cost: 2^10 rounds is the lowest cost still commonly recommended.
pub const BCRYPT_MIN_COST: u32 = 10;
/// Minimum sha-crypt rounds: the default of every generator (glibc, mkpasswd, openssl).
pub const SHA_CRYPT_MIN_ROUNDS: u32 = 5000;
/// Minimum argon2id memory in KiB and memory x passes, from the OWASP table (the
/// weakest line of it, m=7168 t=5).
pub const ARGON2_MIN_M: u64 = 7168;
pub const ARGON2_MIN_MT: u64 = 7168 * 5;
/// The most memory one check may allocate: 256 MiB for its big array, what yescrypt
/// `$y$jDT$` (`mkpasswd -R 9`, 128·r·N bytes) and argon2id m=262144 need, and 1 MiB
/// for the small ones (yescrypt's blocks and S-boxes, per lane). Every connection has
/// a process of its own, so a hundred logins at once may need a hundred times that.
pub const MAX_MEMORY: u64 = MAX_MEMORY_MIB << 20 | 1 << 20;
const MAX_MEMORY_MIB: u64 = 256;
/// The longest one check may take, as estimated: one second on the machine the
/// constants below were measured on (2 x86-64 cores, release build). A login must stay
/// short, and within the default fail delay, with margin for every usual setting:
/// bcrypt up to cost 14, yescrypt up to `$y$jDT$`, argon2id m=256 MiB t=3, sha-crypt
/// 656000 rounds (passlib's default).
pub const MAX_NANOS: u64 = 1_000_000_000;
/// The password length at which costs are judged at load and compared (only sha-crypt's
/// depends on it): longer than what people and password managers use.
pub const NOMINAL_PASSWORD: usize = 64;

// What the estimate counts, in nanoseconds, measured on that machine (whole logins of
// tcpsplice-auth, median, minus the 2 ms a refusal costs without a hash):
/// yescrypt, per 128 bytes mixed, per sixth of a pass (a pass over V mixes 128·r·N
/// bytes; `$y$j9T$` makes 4/3 passes: 26 ms, `$y$jDT$` 444 ms).
const YESCRYPT_NS: u128 = 27;
/// bcrypt, per 2^cost round (cost 12: 241 ms, 14: 862 ms).
const BCRYPT_NS: u128 = 53_000;
/// argon2id, per KiB per half pass, plus one half pass for the allocation
/// (m=262144 t=1: 395 ms, t=3: 905 ms).
const ARGON2_NS: u128 = 500;
/// sha-crypt, per round and per byte of the password plus 72 (1,000,000 rounds of
/// `$6$` with 5 bytes: 200 ms; 100,000 rounds with 4000 bytes: 1092 ms). `$5$` is
/// faster here; it is counted the same.
const SHA_CRYPT_TENTH_NS: u128 = 27;

/// Bytes that are zeroed when dropped: passwords and anything that carried one.
#[derive(Default)]
pub struct Secret(Vec<u8>);

impl Secret {
    pub fn new(v: Vec<u8>) -> Secret {
        Secret(v)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn vec_mut(&mut self) -> &mut Vec<u8> {
        &mut self.0
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// The verifiable schemes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    Yescrypt,
    Argon2id,
    Bcrypt,
    ShaCrypt,
}

impl Scheme {
    pub fn name(self) -> &'static str {
        match self {
            Scheme::Yescrypt => "yescrypt",
            Scheme::Argon2id => "argon2id",
            Scheme::Bcrypt => "bcrypt",
            Scheme::ShaCrypt => "sha-crypt",
        }
    }
}

/// What one check of a hash is estimated to take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Work {
    /// Nanoseconds, whatever the password (None: more than a u128 counts).
    Fixed(Option<u128>),
    /// sha-crypt: every round hashes the password more than once, so its length counts.
    ShaCrypt { rounds: u64 },
}

impl Work {
    /// Estimated nanoseconds for a password of `len` bytes, u64::MAX when they overflow.
    fn nanos(self, len: usize) -> u64 {
        let ns = match self {
            Work::Fixed(ns) => ns,
            Work::ShaCrypt { rounds } => (len as u128 + 72)
                .checked_mul(u128::from(rounds))
                .and_then(|n| n.checked_mul(SHA_CRYPT_TENTH_NS))
                .map(|n| n / 10),
        };
        ns.and_then(|n| u64::try_from(n).ok()).unwrap_or(u64::MAX)
    }
}

/// A stored hash that passed the load-time checks.
#[derive(Clone, Debug)]
pub struct StoredHash {
    pub scheme: Scheme,
    text: String,
    work: Work,
}

impl StoredHash {
    /// The hash as the users file has it.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Checks the format and the cost of a hash from the users file. The error says why
    /// it is refused, for a message that names the file and line.
    pub fn parse(text: &str) -> Result<StoredHash, String> {
        let scheme = classify(text)?;
        // What the parameters say: a name for messages, the memory (None: more than a
        // u64 counts), the time.
        let (what, memory, work): (String, Option<u64>, Work) = match scheme {
            Scheme::Yescrypt => {
                let f: Vec<&str> = text.split('$').collect();
                if f.len() != 5 || f[3].is_empty() || f[4].is_empty() {
                    return Err("malformed yescrypt hash".into());
                }
                let p: yescrypt::Params = f[2]
                    .parse()
                    .map_err(|_| "malformed yescrypt parameters".to_string())?;
                let y = YescryptParams::decode(f[2])
                    .filter(|y| (y.n, y.r, y.p) == (p.n(), p.r(), p.p()))
                    .ok_or_else(|| "malformed yescrypt parameters".to_string())?;
                (
                    format!(
                        "yescrypt parameters {} (N=2^{} r={} p={} t={})",
                        f[2],
                        y.n.trailing_zeros(),
                        y.r,
                        y.p,
                        y.t
                    ),
                    y.memory(),
                    Work::Fixed(y.nanos()),
                )
            }
            Scheme::Argon2id => {
                let h = argon2::PasswordHash::new(text)
                    .map_err(|e| format!("malformed argon2id hash: {e}"))?;
                let p = argon2::Params::try_from(&h)
                    .map_err(|e| format!("bad argon2id parameters: {e}"))?;
                let (m, t) = (u64::from(p.m_cost()), u64::from(p.t_cost()));
                if m < ARGON2_MIN_M || m * t < ARGON2_MIN_MT {
                    return Err(format!(
                        "argon2id m={m} t={t} is too weak (need m>={ARGON2_MIN_M} KiB and m*t>={ARGON2_MIN_MT})"
                    ));
                }
                (
                    format!("argon2id m={m} t={t} p={}", p.p_cost()),
                    Some(m * 1024),
                    Work::Fixed(Some(u128::from(m) * (2 * u128::from(t) + 1) * ARGON2_NS)),
                )
            }
            Scheme::Bcrypt => {
                let b = text.as_bytes();
                let cost: u32 = text
                    .get(4..6)
                    .and_then(|c| c.parse().ok())
                    .ok_or_else(|| "malformed bcrypt hash".to_string())?;
                if b.len() != 60 || b[6] != b'$' || cost > 31 {
                    return Err("malformed bcrypt hash".into());
                }
                if cost < BCRYPT_MIN_COST {
                    return Err(format!(
                        "bcrypt cost {cost} is too weak (need {BCRYPT_MIN_COST} or more: htpasswd -B -C 12)"
                    ));
                }
                (
                    format!("bcrypt cost {cost}"),
                    Some(4096),
                    Work::Fixed(Some((1u128 << cost) * BCRYPT_NS)),
                )
            }
            Scheme::ShaCrypt => {
                let rest = &text[3..];
                let rounds = match rest.strip_prefix("rounds=") {
                    None => SHA_CRYPT_MIN_ROUNDS,
                    Some(r) => r
                        .split('$')
                        .next()
                        .and_then(|n| n.parse().ok())
                        .ok_or_else(|| "malformed sha-crypt rounds".to_string())?,
                };
                if rounds < SHA_CRYPT_MIN_ROUNDS {
                    return Err(format!(
                        "sha-crypt rounds={rounds} is too weak (need {SHA_CRYPT_MIN_ROUNDS} or more)"
                    ));
                }
                if text.split('$').count() < 4 {
                    return Err("malformed sha-crypt hash".into());
                }
                (
                    format!("sha-crypt rounds={rounds}"),
                    Some(0),
                    Work::ShaCrypt {
                        rounds: u64::from(rounds),
                    },
                )
            }
        };
        match memory {
            Some(m) if m <= MAX_MEMORY => {}
            Some(m) => {
                return Err(format!(
                    "{what}: a check needs {} MiB of memory, over the ceiling of {MAX_MEMORY_MIB} MiB",
                    m >> 20,
                ))
            }
            None => {
                return Err(format!(
                    "{what}: a check needs more memory than a 64-bit count holds, over the ceiling of {MAX_MEMORY_MIB} MiB"
                ))
            }
        }
        let ns = work.nanos(NOMINAL_PASSWORD);
        if ns > MAX_NANOS {
            return Err(format!(
                "{what}: a check would take about {} (estimated), over the ceiling of {} s",
                seconds(ns),
                MAX_NANOS / 1_000_000_000
            ));
        }
        Ok(StoredHash {
            scheme,
            text: text.to_string(),
            work,
        })
    }

    /// The estimated nanoseconds of checking a password of `len` bytes.
    pub fn nanos(&self, len: usize) -> u64 {
        self.work.nanos(len)
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether `password` matches. Err is a hash the library could not use: the caller
    /// treats it as a temporary failure rather than as a wrong password. A password
    /// whose check would cost more than [`MAX_NANOS`] (a long one against many rounds
    /// of sha-crypt) is wrong without a check, like one over the length limit.
    pub fn verify(&self, password: &[u8]) -> Result<bool, String> {
        use yescrypt::password_hash::{Error, PasswordVerifier};
        if self.nanos(password.len()) > MAX_NANOS {
            return Ok(false);
        }
        let res = match self.scheme {
            Scheme::Yescrypt => {
                yescrypt::Yescrypt::default().verify_password(password, self.text.as_str())
            }
            Scheme::Argon2id => {
                argon2::Argon2::default().verify_password(password, self.text.as_str())
            }
            Scheme::ShaCrypt => {
                sha_crypt::ShaCrypt::default().verify_password(password, self.text.as_str())
            }
            Scheme::Bcrypt => {
                return bcrypt::verify(password, &self.text).map_err(|e| e.to_string());
            }
        };
        match res {
            Ok(()) => Ok(true),
            Err(Error::PasswordInvalid) => Ok(false),
            Err(e) => Err(format!("{} hash unusable: {e}", self.scheme.name())),
        }
    }
}

/// yescrypt's parameters as the hash spells them (`j9T`: flavor, log2 N, r, then
/// optional p and t), decoded here because the crate does not tell t or the flavor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct YescryptParams {
    /// The native read-write mode (`j`), rather than classic scrypt or write-once.
    rw: bool,
    n: u64,
    r: u32,
    p: u32,
    t: u32,
}

impl YescryptParams {
    /// Decodes the parameter field, as libxcrypt's `decode64_uint32` reads it.
    fn decode(s: &str) -> Option<YescryptParams> {
        let s = s.as_bytes();
        let (flavor, s) = yescrypt_number(s, 0)?;
        let (log2_n, s) = yescrypt_number(s, 1)?;
        let (r, s) = yescrypt_number(s, 1)?;
        let (mut p, mut t) = (1, 0);
        if !s.is_empty() {
            let (have, mut s) = yescrypt_number(s, 1)?;
            if have & 1 != 0 {
                (p, s) = yescrypt_number(s, 2)?;
            }
            if have & 2 != 0 {
                (t, _) = yescrypt_number(s, 1)?;
            }
        }
        Some(YescryptParams {
            rw: flavor != 0 && flavor != 1,
            n: 1u64.checked_shl(log2_n)?,
            r,
            p,
            t,
        })
    }

    /// The bytes one check allocates: V (128·r·N), B (128·r·p), XY (256·r) and, in the
    /// read-write mode, the S-boxes of pwxform (12 KiB per p). None when that does not
    /// fit in a u64: the parameters come from the file, and N alone may be 2^63.
    fn memory(&self) -> Option<u64> {
        let (n, r, lanes) = (self.n, u64::from(self.r), u64::from(self.p));
        let v = r.checked_mul(n)?.checked_mul(128)?;
        let b = r.checked_mul(lanes)?.checked_mul(128)?;
        let s = if self.rw { lanes * 12 * 1024 } else { 0 };
        v.checked_add(b)?.checked_add(256 * r)?.checked_add(s)
    }

    /// The estimated nanoseconds of one check: blocks of 128·r bytes mixed, N per pass.
    /// The read-write mode fills V once and makes 1/3 (t=0), 2/3 (t=1) or t-1 more
    /// passes, all p lanes together; the other modes fill it and make 1, 1.5 or t more
    /// passes, for each of the p lanes (the crate's `smix`).
    fn nanos(&self) -> Option<u128> {
        let t = u128::from(self.t);
        let sixths = match (self.rw, self.t) {
            (true, 0) => 8,
            (true, 1) => 10,
            (true, _) => 6 * t,
            (false, 0) => 12,
            (false, 1) => 15,
            (false, _) => 6 * (1 + t),
        };
        let lanes = if self.rw { 1 } else { u128::from(self.p) };
        u128::from(self.n)
            .checked_mul(u128::from(self.r))?
            .checked_mul(sixths)?
            .checked_mul(lanes)?
            .checked_mul(YESCRYPT_NS)
    }
}

/// One number of yescrypt's variable-width encoding, at least `min`, and what follows.
fn yescrypt_number(s: &[u8], min: u32) -> Option<(u32, &[u8])> {
    const ITOA64: &[u8] = b"./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let digit = |c: u8| ITOA64.iter().position(|&d| d == c).map(|i| i as u32);
    let (&first, mut rest) = s.split_first()?;
    let c = digit(first)?;
    let (mut start, mut end, mut chars, mut bits) = (0u32, 47u32, 1u32, 0u32);
    let mut value = min;
    while c > end {
        value = value.checked_add((end + 1 - start) << bits)?;
        start = end + 1;
        end = start + (62 - end) / 2;
        chars += 1;
        bits += 6;
    }
    value = value.checked_add((c - start) << bits)?;
    for _ in 1..chars {
        let (&b, r) = rest.split_first()?;
        bits -= 6;
        value = value.checked_add(digit(b)? << bits)?;
        rest = r;
    }
    Some((value, rest))
}

/// Nanoseconds as seconds for a message: `1.74 s`.
fn seconds(ns: u64) -> String {
    if ns == u64::MAX {
        return "longer than can be counted".into();
    }
    format!("{:.2} s", ns as f64 / 1e9)
}

/// Names the scheme of a hash, or says why it is refused.
fn classify(text: &str) -> Result<Scheme, String> {
    let weak = |what: &str| {
        Err(format!("{what} is too weak; use yescrypt, argon2id, bcrypt (cost >= {BCRYPT_MIN_COST}) or sha-crypt"))
    };
    if text.is_empty() {
        return Err("empty password hash (no password at all)".into());
    }
    if text.starts_with("$y$") {
        Ok(Scheme::Yescrypt)
    } else if text.starts_with("$argon2id$") {
        Ok(Scheme::Argon2id)
    } else if ["$2a$", "$2b$", "$2y$"].iter().any(|p| text.starts_with(p)) {
        Ok(Scheme::Bcrypt)
    } else if text.starts_with("$5$") || text.starts_with("$6$") {
        Ok(Scheme::ShaCrypt)
    } else if text.starts_with("$1$") {
        weak("md5crypt ($1$)")
    } else if text.starts_with("$apr1$") {
        weak("Apache md5crypt ($apr1$)")
    } else if text.starts_with("{SHA}") || text.starts_with("{SSHA}") {
        weak("unsalted or single-round SHA-1 ({SHA})")
    } else if text.starts_with("$argon2i$") || text.starts_with("$argon2d$") {
        Err("argon2i/argon2d are not accepted: use argon2id".into())
    } else if text.starts_with('$') {
        Err(format!(
            "unknown hash format {}",
            text.split('$')
                .nth(1)
                .map(|s| format!("${s}$"))
                .unwrap_or_default()
        ))
    } else if text.len() == 13
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'/')
    {
        weak("DES crypt")
    } else if text.starts_with('_') && text.len() == 20 {
        weak("BSDi extended DES")
    } else if text == "*" || text.starts_with('!') {
        Err("locked account hash".into())
    } else {
        Err("not a password hash (plain text?)".into())
    }
}

/// Makes a yescrypt hash with the library's default parameters (N=4096, r=32: 16 MiB,
/// the `$y$j9T$` of mkpasswd and Debian's shadow), which verifies in about 50 ms.
pub fn hash_new(password: &[u8]) -> Result<String, String> {
    use yescrypt::password_hash::PasswordHasher;
    yescrypt::Yescrypt::default()
        .hash_password(password)
        .map(|h| h.to_string())
        .map_err(|e| format!("{e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_and_refuses() {
        assert!(StoredHash::parse("$1$abc$def").is_err());
        assert!(StoredHash::parse("$apr1$abc$def").is_err());
        assert!(StoredHash::parse("{SHA}abc").is_err());
        assert!(StoredHash::parse("abcdefghijklm").is_err());
        assert!(StoredHash::parse("secret").is_err());
        assert!(StoredHash::parse("$6$rounds=1000$salt$hash").is_err());
        assert!(StoredHash::parse("$6$salt$hash").is_ok());
        let h = hash_new(b"pw").unwrap();
        let s = StoredHash::parse(&h).unwrap();
        assert_eq!(s.verify(b"pw"), Ok(true));
        assert_eq!(s.verify(b"px"), Ok(false));
    }

    #[test]
    fn decodes_yescrypt_parameters() {
        let y = |s: &str| YescryptParams::decode(s).unwrap();
        let p = |rw, log2_n, r, p, t| YescryptParams {
            rw,
            n: 1u64 << log2_n,
            r,
            p,
            t,
        };
        assert_eq!(y("j9T"), p(true, 12, 32, 1, 0));
        assert_eq!(y("jDT"), p(true, 16, 32, 1, 0));
        assert_eq!(y("j95.0"), p(true, 12, 8, 4, 0));
        assert_eq!(y("j9T/kD"), p(true, 12, 32, 1, 64));
        assert_eq!(y("j9T/s4r"), p(true, 12, 32, 1, 1000));
        assert_eq!(y("jkB."), p(true, 62, 1, 1, 0));
        assert!(!y(".azaaAAa").rw);
        assert!(YescryptParams::decode("j").is_none());
        assert!(YescryptParams::decode("j9T/").is_none());
        assert!(YescryptParams::decode("j9!").is_none());
    }

    #[test]
    fn costs_have_a_ceiling() {
        let ok = |h: &str| {
            StoredHash::parse(h)
                .map(|_| ())
                .map_err(|e| format!("{h}: {e}"))
        };
        let refused = |h: &str, why: &str| match StoredHash::parse(h) {
            Ok(_) => panic!("{h} accepted"),
            Err(e) => assert!(e.contains(why), "{h}: {e}"),
        };
        let bcrypt = |cost: u32| format!("$2y${cost}${}", "a".repeat(53));
        let argon2 = |m: u32, t: u32| {
            format!("$argon2id$v=19$m={m},t={t},p=4$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA")
        };
        for h in [
            "$y$j9T$s$h".to_string(),
            "$y$jDT$s$h".into(),
            "$y$jDT/.$s$h".into(),
            "$y$jDT//$s$h".into(),
            "$y$j9T/i$s$h".into(),
            bcrypt(14),
            argon2(262144, 3),
            argon2(65536, 14),
            argon2(2097152 / 8, 1),
            "$6$rounds=656000$s$h".into(),
            "$6$rounds=2700000$s$h".into(),
        ] {
            ok(&h).unwrap();
        }
        refused("$y$jET$s$h", "512 MiB of memory");
        refused("$y$jkB.$s$h", "more memory than a 64-bit count");
        refused("$y$jDT/0$s$h", "about 1.02 s");
        refused("$y$j9T/j$s$h", "about 1.02 s");
        refused("$y$j9T/kD$s$h", "about 1.36 s");
        refused("$y$j9T/s4r$s$h", "over the ceiling of 1 s");
        refused(&bcrypt(15), "about 1.74 s");
        refused(&bcrypt(31), "over the ceiling");
        refused(&argon2(524288, 1), "512 MiB");
        refused(&argon2(262144, 4), "about 1.18 s");
        refused(&argon2(2097152, 1), "2048 MiB");
        refused("$6$rounds=2800000$s$h", "about 1.03 s");
        refused("$5$rounds=999999999$s$h", "over the ceiling");
    }

    #[test]
    fn a_password_too_costly_to_check_is_wrong_without_a_check() {
        let h = StoredHash::parse("$6$rounds=656000$s$h").unwrap();
        assert!(h.nanos(492) <= MAX_NANOS && h.nanos(493) > MAX_NANOS);
        // The hash is malformed: a check would be an error, not a wrong password.
        assert!(h.verify(&[b'a'; 492]).is_err());
        assert_eq!(h.verify(&[b'a'; 493]), Ok(false));
    }
}
