//! Parsing of option values shared by the programs. Every parse error is a usage error
//! (exit 100) reported by the caller with the option's name.

use std::ffi::OsString;
use std::os::unix::io::RawFd;
use std::sync::Mutex;
use std::time::Duration;

/// An option table in the suite's style: options stop at the first non-option argument,
/// so the next program's options pass through untouched, and `-h` or `--help` asks for
/// the usage.
pub fn options() -> getopts::Options {
    let mut o = getopts::Options::new();
    o.parsing_style(getopts::ParsingStyle::StopAtFirstFree);
    o.optflag("h", "help", "help");
    o
}

/// What a link made of its command line, kept for the next time the same words come
/// (with the same `extra`, for a link whose words mean something else in another
/// environment): a reused connection process of tcpsplice-listen runs each link with the
/// same words for every connection, and building getopts' table and parsing (a copy of
/// every option's names and description, and of every argument) was 3 % of a short
/// connection's CPU. tcpsplice-listen parses ahead ([`crate::chain::parse_ahead`]), so
/// that its connection processes find the parse kept in the memory they share with it.
/// Only a command line that parsed is kept: a wrong one exits.
pub struct ParsedOnce<E: 'static, T: 'static> {
    // Kept for the life of the process (a link's words are the same for every
    // connection), so a connection process reads them where the supervisor put them: a
    // reference count to raise, as an `Arc` clone would, would write to that page and
    // make it the process's own.
    kept: Mutex<Vec<&'static Parsed<E, T>>>,
}

/// The words a link was given, what else its parse depended on, and what it made.
type Parsed<E, T> = (Vec<OsString>, E, T);

/// Most parses one [`ParsedOnce`] keeps: one per place the link has in a chain is the
/// use; beyond, a parse is made and dropped each time rather than kept without bound.
const KEPT_MAX: usize = 4;

/// What [`ParsedOnce::get`] gives: the parse kept, or one made for this time only.
pub enum Parse<T: 'static> {
    Kept(&'static T),
    Own(T),
}

impl<T> std::ops::Deref for Parse<T> {
    type Target = T;
    fn deref(&self) -> &T {
        match self {
            Parse::Kept(t) => t,
            Parse::Own(t) => t,
        }
    }
}

impl<E: PartialEq, T> Default for ParsedOnce<E, T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<E: PartialEq, T> ParsedOnce<E, T> {
    pub const fn new() -> Self {
        ParsedOnce {
            kept: Mutex::new(Vec::new()),
        }
    }

    /// What `parse` gave for `argv` and `extra`, parsing only when they are not among
    /// those kept.
    pub fn get(&self, argv: &[OsString], extra: E, parse: impl FnOnce() -> T) -> Parse<T> {
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, _, v)) = kept
            .iter()
            .find(|(words, e, _)| words.as_slice() == argv && *e == extra)
        {
            return Parse::Kept(v);
        }
        let v = parse();
        if kept.len() >= KEPT_MAX {
            return Parse::Own(v);
        }
        let p: &'static Parsed<E, T> = Box::leak(Box::new((argv.to_vec(), extra, v)));
        kept.push(p);
        Parse::Kept(&p.2)
    }
}

/// Parses `argv` with `o`: a bad option exits 100 with the usage, `-h` (`--help`) prints
/// it on stdout and exits 0.
pub fn parse(o: &getopts::Options, argv: &[OsString], usage: &str) -> getopts::Matches {
    let m = match o.parse(argv) {
        Ok(m) => m,
        Err(e) => crate::diag::usage(&format!("{e}: {usage}")),
    };
    if m.opt_present("h") {
        // In a chain tcpsplice-listen checks, -h is a mistake: it would print the
        // usage to every client (and tcpsplice-listen parses the chain ahead itself,
        // where it would print it and stop the server).
        if crate::chain::checking() {
            crate::diag::usage(&format!(
                "-h asks for the usage, in a chain to serve: {usage}"
            ));
        }
        crate::diag::help(&format!("usage: {usage}\n"));
    }
    m
}

/// Seconds, fractions allowed (`2`, `0.5`, `1.25`): a timeout. Zero means "off" to the
/// callers that allow it.
pub fn seconds(s: &str) -> Option<Duration> {
    let v: f64 = s.trim().parse().ok()?;
    if !v.is_finite() || !(0.0..=1.0e9).contains(&v) {
        return None;
    }
    Some(Duration::from_secs_f64(v))
}

/// A descriptor number.
pub fn fd(s: &str) -> Option<RawFd> {
    let v: RawFd = s.parse().ok()?;
    (0..=1 << 20).contains(&v).then_some(v)
}

/// A byte count with an optional K/M suffix (powers of 1024).
pub fn size(s: &str) -> Option<usize> {
    let (num, mult) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 1024),
        b'm' | b'M' => (&s[..s.len() - 1], 1024 * 1024),
        _ => (s, 1),
    };
    num.parse::<usize>().ok()?.checked_mul(mult)
}

/// A number in a range.
pub fn number<T: std::str::FromStr + PartialOrd>(s: &str, min: T, max: T) -> Option<T> {
    let v: T = s.parse().ok()?;
    (v >= min && v <= max).then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parse_is_kept_for_the_same_words_and_extra_only() {
        let once: ParsedOnce<bool, usize> = ParsedOnce::new();
        let words = |w: &[&str]| w.iter().map(OsString::from).collect::<Vec<_>>();
        let parses = std::cell::Cell::new(0);
        let parse = || {
            parses.set(parses.get() + 1);
            parses.get()
        };
        assert_eq!(*once.get(&words(&["a"]), false, parse), 1);
        assert_eq!(*once.get(&words(&["a"]), false, parse), 1);
        assert_eq!(*once.get(&words(&["a"]), true, parse), 2);
        assert_eq!(*once.get(&words(&["b"]), false, parse), 3);
        assert_eq!(*once.get(&words(&["a"]), true, parse), 2);
        assert_eq!(*once.get(&words(&["c"]), false, parse), 4);
        // Four kept; a fifth is parsed each time, not kept.
        assert!(matches!(
            once.get(&words(&["d"]), false, parse),
            Parse::Own(5)
        ));
        assert!(matches!(
            once.get(&words(&["d"]), false, parse),
            Parse::Own(6)
        ));
        assert!(matches!(
            once.get(&words(&["b"]), false, parse),
            Parse::Kept(3)
        ));
    }

    #[test]
    fn parses_values() {
        assert_eq!(seconds("0.5"), Some(Duration::from_millis(500)));
        assert_eq!(seconds("-1"), None);
        assert_eq!(seconds("x"), None);
        assert_eq!(size("256k"), Some(262144));
        assert_eq!(size("1M"), Some(1 << 20));
        assert_eq!(size("12"), Some(12));
        assert_eq!(size(""), None);
        assert_eq!(fd("7"), Some(7));
        assert_eq!(fd("-1"), None);
        assert_eq!(number("5", 1u32, 10), Some(5));
        assert_eq!(number("11", 1u32, 10), None);
    }
}
