//! Password hashes: which formats the users file may hold, checking a password against
//! one, making a new one (`tcpsplice-auth -H`), and a buffer that forgets its secret.
//!
//! Accepted: yescrypt (`$y$`, what `mkpasswd -m yescrypt` and Debian's shadow make),
//! argon2id (`$argon2id$`), bcrypt (`$2a$ $2b$ $2y$`, cost 10 or more; `htpasswd -B`
//! defaults to 5, so it needs `-C 12`), sha-crypt (`$5$ $6$`, 5000 rounds or more: 5000
//! is the default of glibc, mkpasswd and openssl, so their plain output is accepted).
//! Everything else is refused when the file is loaded: md5crypt (`$1$`, `$apr1$`), DES,
//! `{SHA}`, plain text, and formats we cannot verify.

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
/// Cap on the memory a stored hash may ask for (1 GiB): a typo in the file must not
/// make every login allocate without bound.
const MAX_MEMORY: u64 = 1 << 30;

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

/// A stored hash that passed the load-time checks.
#[derive(Clone, Debug)]
pub struct StoredHash {
    pub scheme: Scheme,
    text: String,
}

impl StoredHash {
    /// Checks the format and the cost of a hash from the users file. The error says why
    /// it is refused, for a message that names the file and line.
    pub fn parse(text: &str) -> Result<StoredHash, String> {
        let scheme = classify(text)?;
        let ok = |scheme| {
            Ok(StoredHash {
                scheme,
                text: text.to_string(),
            })
        };
        match scheme {
            Scheme::Yescrypt => {
                let f: Vec<&str> = text.split('$').collect();
                if f.len() != 5 || f[3].is_empty() || f[4].is_empty() {
                    return Err("malformed yescrypt hash".into());
                }
                let p: yescrypt::Params = f[2]
                    .parse()
                    .map_err(|_| "malformed yescrypt parameters".to_string())?;
                if yescrypt_memory(&p).is_none_or(|m| m > MAX_MEMORY) {
                    return Err(format!(
                        "yescrypt parameters {} ask for more memory than 1 GiB",
                        f[2]
                    ));
                }
                ok(scheme)
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
                if m * 1024 > MAX_MEMORY {
                    return Err("argon2id parameters ask for more than 1 GiB".into());
                }
                ok(scheme)
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
                ok(scheme)
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
                ok(scheme)
            }
        }
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether `password` matches. Err is a hash the library could not use: the caller
    /// treats it as a temporary failure rather than as a wrong password.
    pub fn verify(&self, password: &[u8]) -> Result<bool, String> {
        use yescrypt::password_hash::{Error, PasswordVerifier};
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

/// The bytes one yescrypt check allocates: V (128·r·N), B (128·r·p), XY (256·r) and
/// the S-boxes of pwxform (12 KiB per p). None when that does not fit in a u64: the
/// parameters are decoded from the file, and N alone may be 2^63.
fn yescrypt_memory(p: &yescrypt::Params) -> Option<u64> {
    let (n, r, lanes) = (p.n(), u64::from(p.r()), u64::from(p.p()));
    let v = r.checked_mul(n)?.checked_mul(128)?;
    let b = r.checked_mul(lanes)?.checked_mul(128)?;
    let s = lanes.checked_mul(12 * 1024)?;
    v.checked_add(b)?.checked_add(256 * r)?.checked_add(s)
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
}
