//! The users file: `user:hash[:rules]` lines, `#` comments and blank lines.
//!
//! Every line is checked when the file is loaded; a weak or unknown hash format, a
//! duplicate user or a bad rule stops the program with the file and line named, rather
//! than leaving a user who can never log in (or one who logs in too cheaply).
//! The optional third field restricts the user's targets: rules in tcpsplice-dial's
//! syntax (`CIDR`, `CIDR:PORT`), separated by spaces or commas; among them, `conns=N`
//! caps the user's connections at once under tcpsplice-listen (0: no cap, whatever
//! tcpsplice-auth's `-l` says).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::password::{Secret, StoredHash};
use super::request::{Checker, Verdict};
use crate::rules;

/// Checked against when the user is unknown and the file has no user whose hash could
/// stand in (see [`Users::costliest`]).
const DUMMY_HASH: &str =
    "$y$j9T$kwh3NjHXdWiY3z2IL7Lv50$Glv.1xcr1P8l3iXZqFb/S6R3eKlAfNO.rR3xUTzo4BC";

struct Entry {
    hash: StoredHash,
    rules: Option<String>,
    /// `conns=N` of the third field.
    conns: Option<usize>,
}

/// The largest `conns=N`: as many as tcpsplice-listen may serve at once.
pub const MAX_CONNS: usize = 100_000;

/// How long after its last change a users file is kept by [`Users::load_kept`].
const SETTLE: Duration = Duration::from_secs(2);

/// What tells one version of a file from another.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FileKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileKey {
    /// Whether the file last changed more than [`SETTLE`] ago.
    fn settled(&self) -> bool {
        let Ok(now) = SystemTime::now().duration_since(UNIX_EPOCH) else {
            return false;
        };
        let (secs, nsecs) = self.mtime.max(self.ctime);
        let (Ok(secs), Ok(nsecs)) = (u64::try_from(secs), u32::try_from(nsecs)) else {
            return false;
        };
        now.checked_sub(Duration::new(secs, nsecs))
            .is_some_and(|age| age > SETTLE)
    }
}

fn file_key(path: &Path) -> Option<FileKey> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(FileKey {
        dev: m.dev(),
        ino: m.ino(),
        size: m.size(),
        mtime: (m.mtime(), m.mtime_nsec()),
        ctime: (m.ctime(), m.ctime_nsec()),
    })
}

/// The loaded users file.
pub struct Users {
    entries: HashMap<Vec<u8>, Entry>,
    /// DUMMY_HASH, for a file without users.
    fallback: StoredHash,
    /// Whether a line has a `conns=N` above 0: asked at every connection, so worked
    /// out once rather than over every line each time.
    conn_limits: bool,
}

impl Users {
    /// Loads and checks `path`. The error reads `FILE line N: WHY` (or `FILE: WHY`).
    /// `warn` says whether to warn about a file every user may read: once per start is
    /// enough where the start is checked (tcpsplice-listen), not once per connection.
    pub fn load(path: &Path, warn: bool) -> Result<Users, String> {
        let shown = path.display();
        let data = std::fs::read(path)
            .map_err(|e| format!("unable to read {shown}: {}", crate::sys::strerror(&e)))?;
        let data = Secret::new(data);
        if let Ok(meta) = std::fs::metadata(path) {
            use std::os::unix::fs::PermissionsExt;
            if warn && meta.permissions().mode() & 0o004 != 0 {
                crate::diag::warn(&format!(
                    "{shown} is readable by every user: its hashes can be guessed offline (chmod o-r)"
                ));
            }
        }
        let text =
            std::str::from_utf8(data.as_bytes()).map_err(|_| format!("{shown}: not UTF-8 text"))?;
        Users::parse(text).map_err(|(line, why)| format!("{shown} line {line}: {why}"))
    }

    /// [`Users::load`], kept for the life of the process while the file stays as it
    /// was: a reused connection process of tcpsplice-listen serves many connections,
    /// and each would otherwise read and parse the file again (six syscalls, and a
    /// hash-map built of every line). One stat tells whether it changed: device, inode,
    /// size, modification and change times. A file changed within the last
    /// [`SETTLE`] is not kept (its times may not yet tell two writes apart: the
    /// kernel's clock for them ticks in milliseconds), so it is read at every
    /// connection until it has settled. What is kept are the file's hashes, which
    /// the process could read from the file anyway; no password is in them.
    pub fn load_kept(path: &Path, warn: bool) -> Result<Arc<Users>, String> {
        static KEPT: Mutex<Option<(PathBuf, FileKey, Arc<Users>)>> = Mutex::new(None);
        let before = file_key(path);
        {
            let kept = KEPT.lock().unwrap_or_else(|e| e.into_inner());
            if let (Some((p, key, users)), Some(now)) = (&*kept, &before) {
                if p == path && key == now {
                    return Ok(Arc::clone(users));
                }
            }
        }
        let users = Arc::new(Users::load(path, warn)?);
        let mut kept = KEPT.lock().unwrap_or_else(|e| e.into_inner());
        *kept = before
            .filter(FileKey::settled)
            .map(|key| (path.to_path_buf(), key, Arc::clone(&users)));
        Ok(users)
    }

    /// Parses the text of a users file; Err is (line number, why).
    pub fn parse(text: &str) -> Result<Users, (usize, String)> {
        let mut entries = HashMap::new();
        for (i, raw) in text.lines().enumerate() {
            let n = i + 1;
            let line = raw.trim_end_matches('\r');
            if line.trim().is_empty() || line.trim_start().starts_with('#') {
                continue;
            }
            let mut fields = line.splitn(3, ':');
            let name = fields.next().unwrap_or("");
            let Some(hash) = fields.next() else {
                return Err((n, "expected user:hash[:rules]".into()));
            };
            if !super::request::user_name_ok(name.as_bytes()) {
                return Err((
                    n,
                    "bad user name (1 to 255 printable ASCII bytes, no colon)".into(),
                ));
            }
            let hash =
                StoredHash::parse(hash.trim()).map_err(|why| (n, format!("user {name}: {why}")))?;
            let (rules, conns) = match fields.next() {
                None => (None, None),
                Some(r) => {
                    let (rules, conns) =
                        parse_rules(r).map_err(|why| (n, format!("user {name}: {why}")))?;
                    (Some(rules).filter(|r| !r.is_empty()), conns)
                }
            };
            if entries
                .insert(name.as_bytes().to_vec(), Entry { hash, rules, conns })
                .is_some()
            {
                return Err((n, format!("user {name} appears twice")));
            }
        }
        let fallback = StoredHash::parse(DUMMY_HASH).map_err(|e| (0, e))?;
        let conn_limits = entries
            .values()
            .any(|e: &Entry| e.conns.is_some_and(|n| n > 0));
        Ok(Users {
            entries,
            fallback,
            conn_limits,
        })
    }

    /// The hash that costs the most to check `len` bytes against, by the estimate of
    /// its parameters: an unknown user's password is checked against it, so that no
    /// user's wrong password costs more than an unknown user's. Per length, because
    /// sha-crypt's cost grows with it and the others' do not.
    fn costliest(&self, len: usize) -> &StoredHash {
        self.entries
            .values()
            .map(|e| &e.hash)
            .max_by_key(|h| h.nanos(len))
            .unwrap_or(&self.fallback)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The `conns=N` of `user`'s line, if it has one (Some(0): no cap).
    pub fn conn_limit(&self, user: &[u8]) -> Option<usize> {
        self.entries.get(user).and_then(|e| e.conns)
    }

    /// Whether any line has a `conns=N` above 0.
    pub fn has_conn_limits(&self) -> bool {
        self.conn_limits
    }
}

/// Checks each word of a users line's third field: target rules, joined with spaces,
/// and at most one `conns=N`.
fn parse_rules(field: &str) -> Result<(String, Option<usize>), String> {
    let mut out = Vec::new();
    let mut conns = None;
    for r in field
        .split(|c: char| c == ',' || c.is_ascii_whitespace())
        .filter(|r| !r.is_empty())
    {
        if let Some(n) = r.strip_prefix("conns=") {
            if conns.is_some() {
                return Err("conns= given twice".into());
            }
            let n = crate::args::number(n, 0, MAX_CONNS)
                .ok_or_else(|| format!("conns= is not a number from 0 to {MAX_CONNS}: {n}"))?;
            conns = Some(n);
            continue;
        }
        rules::Rule::parse(r)?;
        out.push(r);
    }
    Ok((out.join(" "), conns))
}

impl Checker for Users {
    fn check(&self, user: &[u8], password: &Secret) -> Verdict {
        match self.entries.get(user) {
            Some(e) => match e.hash.verify(password.as_bytes()) {
                Ok(true) => Verdict::Accept {
                    rules: e.rules.clone(),
                },
                Ok(false) => Verdict::Reject,
                Err(why) => Verdict::Temporary(why),
            },
            None => {
                self.waste_time(password);
                Verdict::Reject
            }
        }
    }

    fn cache_key(&self, user: &[u8]) -> Option<(&[u8], Option<&str>)> {
        let e = self.entries.get(user)?;
        Some((e.hash.text().as_bytes(), e.rules.as_deref()))
    }

    fn waste_time(&self, password: &Secret) {
        // The time the dearest wrong password costs; the answer does not matter.
        let _ = self
            .costliest(password.as_bytes().len())
            .verify(password.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lines() {
        let u = Users::parse("# c\n\nalice:$6$salt$abc:10.0.0.0/8, 192.0.2.1/32:443\n").unwrap();
        assert_eq!(u.len(), 1);
        assert_eq!(
            u.entries[&b"alice"[..]].rules.as_deref(),
            Some("10.0.0.0/8 192.0.2.1/32:443")
        );
        assert_eq!(Users::parse("a:$1$x$y\n").err().map(|e| e.0), Some(1));
        assert_eq!(Users::parse("\nb:plain\n").err().map(|e| e.0), Some(2));
        assert!(Users::parse("a:$6$s$h\na:$6$s$h\n").is_err());
        assert!(Users::parse("a:$6$s$h:notarule\n").is_err());
    }

    #[test]
    fn conns_is_a_limit_not_a_rule() {
        let u = Users::parse("a:$6$s$h:conns=2, 10.0.0.0/8\nb:$6$s$h:conns=0\nc:$6$s$h\n").unwrap();
        assert_eq!(u.entries[&b"a"[..]].rules.as_deref(), Some("10.0.0.0/8"));
        assert_eq!(u.conn_limit(b"a"), Some(2));
        assert_eq!(u.entries[&b"b"[..]].rules, None);
        assert_eq!(u.conn_limit(b"b"), Some(0));
        assert_eq!(u.conn_limit(b"c"), None);
        assert!(u.has_conn_limits());
        for bad in [
            "conns=x",
            "conns=-1",
            "conns=100001",
            "conns=1 conns=2",
            "conns=",
        ] {
            assert!(Users::parse(&format!("a:$6$s$h:{bad}\n")).is_err(), "{bad}");
        }
        assert!(!Users::parse("b:$6$s$h:conns=0\n")
            .unwrap()
            .has_conn_limits());
    }

    #[test]
    fn the_costliest_hash_stands_in_for_an_unknown_user() {
        let text = "a:$6$s$h\nb:$2y$12$aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\n\
                    c:$6$rounds=600000$s$h\nd:$y$j9T$s$h\n";
        let u = Users::parse(text).unwrap();
        assert!(u.costliest(8).as_str().starts_with("$2y$12$"));
        // A long password costs sha-crypt more: then its most rounds cost the most.
        assert!(u.costliest(400).as_str().starts_with("$6$rounds=600000$"));
        let empty = Users::parse("# nobody\n").unwrap();
        assert_eq!(empty.costliest(8).as_str(), DUMMY_HASH);
    }
}
