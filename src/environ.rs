//! The environment as the chain's programs see it: every program of the suite reads and
//! changes variables here, never through `std::env`.
//!
//! Why: under tcpsplice-listen a whole chain runs in one process, and that process
//! serves connection after connection (`chain`, `listen::worker`), so the per-connection
//! variables (`TCP*`, `TCPSPLICE_*`) would otherwise be set, unset and put back in the
//! C library's environment for every connection. glibc's setenv scans the whole
//! environment, allocates, and records each distinct string in a tree it never frees
//! (a reused process grows with every client), and putting the environment back meant
//! comparing all of it: together about a tenth of the relay's CPU per short connection.
//!
//! So changes go to an overlay, which reads consult before the real environment, and
//! which becomes real only where something other than our code reads the environment:
//! before a real exec ([`make_real`]), in a child we spawn ([`pass_to`]), and once in
//! tcpsplice-listen before it forks. A reused connection process is put back by
//! dropping the overlay's changes (its entries stay, for their buffers); [`Fork::restore`] checks, without allocating, that nothing
//! changed the real environment behind our back (a library, say) and only then does the
//! full comparison.

// The one module that may go to the real environment (clippy.toml forbids it elsewhere).
#![allow(clippy::disallowed_methods)]

use std::collections::HashMap;
use std::env::VarError;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::process::Command;
use std::sync::Mutex;

use crate::sys;

/// One variable the overlay knows of. Entries outlive the changes they hold: a reused
/// connection process sets the same variables for every connection, and an entry whose
/// change was dropped or made real ([`State::Real`]) keeps its name and value buffers
/// for the next one, where a fresh pair would cost two allocations per variable.
struct Entry {
    name: OsString,
    value: OsString,
    state: State,
    /// Whether `name` passed [`check_name`]: an entry first made by a read was not
    /// checked, and a change must not skip the check on its account.
    checked: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    /// No change: the real environment has it (or not).
    Real,
    /// No change, and the real environment was read: it has `value` (true) or not.
    /// Only our own changes make the real environment differ from what a process
    /// started with (and [`Fork::restore`] notices any other), so a reused process
    /// reads it once per variable instead of scanning it at every connection.
    Known(bool),
    /// Set to `value`.
    Set,
    /// Removed.
    Removed,
}

/// The entries, with a hint of where to find each name. A chain's programs read and
/// set some 40 variables about 90 times per connection, nearly always by a name that is
/// a literal of the program: the same address each time. So the address picks a hint
/// slot, the hinted entry is compared once, and only a miss scans the list (a scan was
/// 7 % of a short connection's instructions; a hash of the name's bytes cost more).
struct Overlay {
    entries: Vec<Entry>,
    hints: [u8; HINTS],
}

const HINTS: usize = 256;
const NO_HINT: u8 = u8::MAX;

static OVERLAY: Mutex<Overlay> = Mutex::new(Overlay {
    entries: Vec::new(),
    hints: [NO_HINT; HINTS],
});

fn overlay() -> std::sync::MutexGuard<'static, Overlay> {
    OVERLAY.lock().unwrap_or_else(|e| e.into_inner())
}

/// The hint slot of a name at this address and of this length.
fn hint_slot(name: &OsStr) -> usize {
    let b = name.as_bytes();
    let key = (b.as_ptr() as usize as u64) ^ ((b.len() as u64) << 48);
    // Fibonacci hashing: the top bits of one multiply.
    (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - HINTS.trailing_zeros())) as usize
}

/// The value of `name`, as `std::env::var_os` would give it after the changes made here.
pub fn var_os(name: impl AsRef<OsStr>) -> Option<OsString> {
    with_var(name, |v| v.map(OsStr::to_os_string))
}

/// Runs `f` on the value of `name` (as [`var_os`] would give it), without a copy: for
/// checks, which a reused process makes at every connection. `f` runs with the overlay
/// locked: it must not call into this module (nor `diag`, which reads it).
pub fn with_var<R>(name: impl AsRef<OsStr>, f: impl FnOnce(Option<&OsStr>) -> R) -> R {
    let name = name.as_ref();
    let mut o = overlay();
    let e = entry(&mut o, name, false);
    if e.state == State::Real {
        let real = std::env::var_os(name);
        e.value.clear();
        if let Some(v) = &real {
            e.value.push(v);
        }
        e.state = State::Known(real.is_some());
    }
    match e.state {
        State::Set | State::Known(true) => f(Some(&e.value)),
        _ => f(None),
    }
}

/// The value of `name` as text, as `std::env::var` would give it.
pub fn var(name: impl AsRef<OsStr>) -> Result<String, VarError> {
    match var_os(name) {
        Some(v) => v.into_string().map_err(VarError::NotUnicode),
        None => Err(VarError::NotPresent),
    }
}

/// What setenv(3) would refuse, and `std::env::set_var` panic on: refused here, when the
/// change is made, not later at an exec, so that an in-process chain fails as an exec'd
/// one does.
fn check_name(name: &OsStr) {
    let b = name.as_bytes();
    assert!(
        !b.is_empty() && !b.contains(&b'=') && !b.contains(&0),
        "invalid environment variable name {name:?}"
    );
}

/// Sets `name` to `value` for this program, the programs it continues with in-process,
/// and those it execs or spawns.
pub fn set_var(name: impl AsRef<OsStr>, value: impl AsRef<OsStr>) {
    let (name, value) = (name.as_ref(), value.as_ref());
    assert!(
        !value.as_bytes().contains(&0),
        "environment variable {name:?} with a NUL byte in its value"
    );
    change(name, Some(value));
}

/// Removes `name`, as `std::env::remove_var` would.
pub fn remove_var(name: impl AsRef<OsStr>) {
    change(name.as_ref(), None);
}

/// The overlay's entry for `name`, made (knowing nothing yet) if it has none; its name
/// checked first if `check` (for a change).
fn entry<'a>(o: &'a mut Overlay, name: &OsStr, check: bool) -> &'a mut Entry {
    let slot = hint_slot(name);
    let hinted = usize::from(o.hints[slot]);
    let i = if o.entries.get(hinted).is_some_and(|e| e.name == name) {
        hinted
    } else {
        let i = match o.entries.iter().position(|e| e.name == name) {
            Some(i) => i,
            None => {
                o.entries.push(Entry {
                    name: name.to_os_string(),
                    value: OsString::new(),
                    state: State::Real,
                    checked: false,
                });
                o.entries.len() - 1
            }
        };
        if let Some(h) = u8::try_from(i).ok().filter(|&h| h != NO_HINT) {
            o.hints[slot] = h;
        }
        i
    };
    let e = &mut o.entries[i];
    if check && !e.checked {
        check_name(name);
        e.checked = true;
    }
    e
}

fn change(name: &OsStr, value: Option<&OsStr>) {
    let mut o = overlay();
    let e = entry(&mut o, name, true);
    match value {
        Some(v) => {
            e.value.clear();
            e.value.push(v);
            e.state = State::Set;
        }
        None => e.state = State::Removed,
    }
}

/// Applies the overlay to the real environment and forgets its changes (and what it
/// read of the real one): before an exec, which passes the C library's environment on,
/// or where something other than this module will read it. Costs a setenv per change, which only a real exec (or a process's start)
/// pays.
pub fn make_real() {
    make_real_in(&mut overlay());
}

fn make_real_in(o: &mut Overlay) {
    for e in o.entries.iter_mut() {
        match e.state {
            State::Set => std::env::set_var(&e.name, &e.value),
            State::Removed => std::env::remove_var(&e.name),
            State::Real | State::Known(_) => {}
        }
        e.state = State::Real;
    }
}

/// Gives the child `cmd` will start the environment an exec from here would pass on:
/// the real one with the overlay's changes.
pub fn pass_to(cmd: &mut Command) {
    for e in overlay().entries.iter() {
        match e.state {
            State::Set => {
                cmd.env(&e.name, &e.value);
            }
            State::Removed => {
                cmd.env_remove(&e.name);
            }
            State::Real | State::Known(_) => {}
        }
    }
}

/// An environment as it was at one moment: what [`Fork::restore`] puts back.
struct Snapshot {
    /// The C library's environment array then: the address of each entry, compared
    /// after each connection to see that nothing changed it.
    entries: Vec<usize>,
    /// Its variables, for the rare restore after something did.
    vars: HashMap<OsString, OsString>,
}

impl Snapshot {
    fn now() -> Snapshot {
        let mut entries = Vec::new();
        sys::environ_entries(&mut entries);
        let vars = std::env::vars_os().collect();
        Snapshot { entries, vars }
    }
}

/// The environment tcpsplice-listen forks its connection processes with, taken once
/// before the first fork ([`remember_for_forks`]). Why: a process's own copy was the
/// largest part of its heap (11 KB in 120 allocations under a usual login environment,
/// written all over the pages it shares with the supervisor); this one is the
/// supervisor's, which the processes only read.
static FORKED_WITH: std::sync::OnceLock<Snapshot> = std::sync::OnceLock::new();

/// Makes the environment real and remembers it as what connection processes forked from
/// now on start with: for a supervisor, after its last change of the environment.
pub fn remember_for_forks() {
    // One hold of the overlay throughout: a change made between making it real and
    // dropping the entries would be lost.
    let mut o = overlay();
    make_real_in(&mut o);
    let _ = FORKED_WITH.get_or_init(Snapshot::now);
    // The entries are real now, and a forked process makes its own: written by every
    // one of them, the supervisor's would be a private heap page of each.
    o.entries = Vec::new();
    o.hints = [NO_HINT; HINTS];
}

/// The environment a freshly forked connection process had, to put back after each
/// connection (`listen::worker`).
pub struct Fork {
    /// None while it is [`FORKED_WITH`]'s, as nearly always.
    own: Option<Snapshot>,
}

impl Fork {
    /// Takes the environment as it is now, made real first: the fork inherited the
    /// supervisor's overlay, if it had one. It is the supervisor's remembered one when
    /// every entry is still where it was then.
    pub fn now() -> Fork {
        make_real();
        match FORKED_WITH.get() {
            Some(s) if sys::environ_entries_are(&s.entries) => Fork { own: None },
            _ => Fork {
                own: Some(Snapshot::now()),
            },
        }
    }

    /// Puts the environment back as it was at [`Fork::now`]: the overlay dropped, and
    /// the real environment compared and set back only if something changed it.
    pub fn restore(&mut self) {
        let mut o = overlay();
        for e in o.entries.iter_mut() {
            if matches!(e.state, State::Set | State::Removed) {
                // Kept for the next connection, the buffer is wiped first: a value may
                // be a client's (TCPSPLICE_HTTP_HEAD holds its request head, cookies
                // and all), and nothing of one connection is left to the next.
                let mut v = std::mem::take(&mut e.value).into_vec();
                v.fill(0);
                v.clear();
                e.value = OsString::from_vec(v);
                e.state = State::Real;
            }
        }
        let Some(was) = self.own.as_ref().or_else(|| FORKED_WITH.get()) else {
            return;
        };
        if sys::environ_entries_are(&was.entries) {
            return;
        }
        // Changed behind our back: what was read of it is no longer known.
        for e in o.entries.iter_mut() {
            e.state = State::Real;
        }
        drop(o);
        // Its own, taken; the supervisor's, copied (the first time only).
        let vars = match self.own.take() {
            Some(own) => own.vars,
            None => FORKED_WITH
                .get()
                .map(|s| s.vars.clone())
                .unwrap_or_default(),
        };
        let now: HashMap<OsString, OsString> = std::env::vars_os().collect();
        for k in now.keys() {
            if !vars.contains_key(k) {
                std::env::remove_var(k);
            }
        }
        for (k, v) in &vars {
            if now.get(k) != Some(v) {
                std::env::set_var(k, v);
            }
        }
        // The entries are new strings now: the next check compares against these.
        let mut entries = Vec::new();
        sys::environ_entries(&mut entries);
        self.own = Some(Snapshot { entries, vars });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The unit tests share one process, its environment and the overlay: each uses
    // names of its own, and those that change either take turns.
    static TURN: Mutex<()> = Mutex::new(());

    fn turn() -> std::sync::MutexGuard<'static, ()> {
        TURN.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `body` in a process of its own: the test binary again, given only the test
    /// `name`. For a test that puts the whole environment back (or drops the overlay's
    /// entries), which would undo what tests on other threads set meanwhile.
    fn alone(name: &str, body: impl FnOnce()) {
        if std::env::var_os("TCPSPLICE_T_ALONE").is_some() {
            body();
            return;
        }
        let exe = std::env::current_exe().expect("the test binary");
        let out = Command::new(exe)
            .args([name, "--exact", "--test-threads", "1"])
            .env("TCPSPLICE_T_ALONE", "1")
            .output()
            .expect("run the test binary");
        let shown = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && shown.contains("1 passed"),
            "{name} in a process of its own: {shown}"
        );
    }

    #[test]
    fn the_overlay_is_read_first_and_made_real_on_demand() {
        let _turn = turn();
        std::env::set_var("TCPSPLICE_T_REAL", "real");
        assert_eq!(var("TCPSPLICE_T_REAL").as_deref(), Ok("real"));
        set_var("TCPSPLICE_T_REAL", "over");
        set_var("TCPSPLICE_T_NEW", "new");
        remove_var("TCPSPLICE_T_NEW");
        set_var("TCPSPLICE_T_NEW", "again");
        assert_eq!(var("TCPSPLICE_T_REAL").as_deref(), Ok("over"));
        assert_eq!(var("TCPSPLICE_T_NEW").as_deref(), Ok("again"));
        // Not real yet: a child sees the real environment unless given the overlay.
        assert_eq!(std::env::var("TCPSPLICE_T_REAL").as_deref(), Ok("real"));
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "echo $TCPSPLICE_T_REAL $TCPSPLICE_T_NEW"]);
        pass_to(&mut cmd);
        let out = cmd.output().expect("run sh");
        assert_eq!(out.stdout, b"over again\n");
        remove_var("TCPSPLICE_T_REAL");
        assert_eq!(var("TCPSPLICE_T_REAL"), Err(VarError::NotPresent));
        make_real();
        assert_eq!(std::env::var_os("TCPSPLICE_T_REAL"), None);
        assert_eq!(std::env::var("TCPSPLICE_T_NEW").as_deref(), Ok("again"));
        std::env::remove_var("TCPSPLICE_T_NEW");
    }

    #[test]
    fn a_fork_is_put_back_even_after_a_real_change() {
        alone(
            "environ::tests::a_fork_is_put_back_even_after_a_real_change",
            a_fork_is_put_back_even_after_a_real_change_alone,
        );
    }

    fn a_fork_is_put_back_even_after_a_real_change_alone() {
        let _turn = turn();
        std::env::set_var("TCPSPLICE_T_KEPT", "1");
        let mut fork = Fork::now();
        set_var("TCPSPLICE_T_KEPT", "2");
        fork.restore();
        assert_eq!(var("TCPSPLICE_T_KEPT").as_deref(), Ok("1"));
        // Behind the overlay's back: the check sees the array changed.
        std::env::set_var("TCPSPLICE_T_KEPT", "3");
        std::env::set_var("TCPSPLICE_T_ADDED", "x");
        fork.restore();
        assert_eq!(std::env::var("TCPSPLICE_T_KEPT").as_deref(), Ok("1"));
        assert_eq!(std::env::var_os("TCPSPLICE_T_ADDED"), None);
        let own = fork.own.as_ref().expect("a fork's own snapshot");
        assert!(sys::environ_entries_are(&own.entries));
        std::env::remove_var("TCPSPLICE_T_KEPT");
    }

    #[test]
    fn a_fork_of_a_remembered_environment_shares_it_and_is_put_back_to_it() {
        alone(
            "environ::tests::a_fork_of_a_remembered_environment_shares_it_and_is_put_back_to_it",
            a_fork_of_a_remembered_environment_alone,
        );
    }

    fn a_fork_of_a_remembered_environment_alone() {
        let _turn = turn();
        std::env::set_var("TCPSPLICE_T_REMEMBERED", "1");
        set_var("TCPSPLICE_T_OVERLAID", "o");
        remember_for_forks();
        // Made real, and nothing left in the overlay.
        assert_eq!(std::env::var("TCPSPLICE_T_OVERLAID").as_deref(), Ok("o"));
        assert!(overlay().entries.is_empty());
        let mut fork = Fork::now();
        assert!(fork.own.is_none(), "the remembered environment is shared");
        set_var("TCPSPLICE_T_REMEMBERED", "2");
        fork.restore();
        assert_eq!(var("TCPSPLICE_T_REMEMBERED").as_deref(), Ok("1"));
        assert!(fork.own.is_none(), "the overlay's change cost no copy");
        std::env::set_var("TCPSPLICE_T_REMEMBERED", "3");
        std::env::remove_var("TCPSPLICE_T_OVERLAID");
        fork.restore();
        assert_eq!(std::env::var("TCPSPLICE_T_REMEMBERED").as_deref(), Ok("1"));
        assert_eq!(std::env::var("TCPSPLICE_T_OVERLAID").as_deref(), Ok("o"));
        let own = fork
            .own
            .as_ref()
            .expect("its own snapshot after a real change");
        assert!(sys::environ_entries_are(&own.entries));
        std::env::remove_var("TCPSPLICE_T_REMEMBERED");
        std::env::remove_var("TCPSPLICE_T_OVERLAID");
    }

    #[test]
    fn a_name_is_one_variable_whatever_its_address_and_hint() {
        let _turn = turn();
        // More names than hint slots, each read and changed through literals and
        // through copies at other addresses: every spelling finds the same entry.
        let names: Vec<String> = (0..3 * HINTS)
            .map(|i| format!("TCPSPLICE_T_H{i}"))
            .collect();
        for (i, n) in names.iter().enumerate() {
            set_var(n.as_str(), i.to_string());
        }
        set_var("TCPSPLICE_T_H7", "literal");
        for (i, n) in names.iter().enumerate() {
            let copy = n.clone();
            let want = if i == 7 {
                "literal".to_string()
            } else {
                i.to_string()
            };
            assert_eq!(var(&copy).as_deref(), Ok(want.as_str()), "{n}");
            assert_eq!(var(n).as_deref(), Ok(want.as_str()), "{n}");
        }
        assert_eq!(var("TCPSPLICE_T_H7").as_deref(), Ok("literal"));
        for n in &names {
            remove_var(n.clone());
            assert_eq!(var(n), Err(VarError::NotPresent));
        }
        make_real();
    }

    #[test]
    #[should_panic(expected = "invalid environment variable name")]
    fn a_name_first_read_is_still_checked_when_set() {
        let _turn = turn();
        assert!(var_os("TCPSPLICE_T_BAD=NAME").is_none());
        set_var("TCPSPLICE_T_BAD=NAME", "x");
    }

    /// Only this module changes the real environment, and only it reads it for a
    /// variable: anything else would miss or defeat the overlay.
    #[test]
    fn nothing_else_goes_to_std_env_for_variables() {
        let mut bad = Vec::new();
        let mut dirs = vec![std::path::PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/src"
        ))];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d).expect("read src").flatten() {
                let p = e.path();
                if p.is_dir() {
                    dirs.push(p);
                    continue;
                }
                if p.extension().is_none_or(|x| x != "rs") || p.ends_with("src/environ.rs") {
                    continue;
                }
                let text = std::fs::read_to_string(&p).expect("read a source file");
                let code = text
                    .lines()
                    .enumerate()
                    .filter(|(_, l)| !l.trim().starts_with("//"));
                for (i, line) in code {
                    let forbidden = [
                        "env::var",
                        "env::set_var",
                        "env::remove_var",
                        "setenv",
                        "putenv",
                        "clearenv",
                    ];
                    if forbidden.iter().any(|f| line.contains(f)) {
                        bad.push(format!("{}:{}: {}", p.display(), i + 1, line.trim()));
                    }
                }
                if text.contains("Command::new(") && !text.contains("environ::pass_to(") {
                    bad.push(format!("{}: spawns without environ::pass_to", p.display()));
                }
            }
        }
        assert!(
            bad.is_empty(),
            "std::env used for variables:\n{}",
            bad.join("\n")
        );
    }
}
