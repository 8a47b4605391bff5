//! Chain loading: the last thing a link of the chain does is exec the rest of its
//! command line, so that no code of its own stays on the connection.
//!
//! When the next program is a sibling binary of the same installation (tcpsplice,
//! tcpsplice-dial, tcpsplice-auth in the same directory as the running program) and the
//! running link has said it holds nothing the next one must not inherit
//! ([`allow_in_process`]), the sibling's `main` runs in this process instead: the
//! descriptors, environment and signal state it sees are those an exec would have left,
//! and the connection is spared the exec. On a VM where a page fault costs ~9 µs, the
//! exec of a small dynamically linked program costs ~0.7 ms of CPU, more than
//! everything else a short connection does. `TCPSPLICE_EXEC=always` turns this off.
//!
//! A sibling run in-process returns its exit status to the caller of [`exec`] at a
//! normal end, which lets tcpsplice-listen's connection process serve the next
//! connection (see `listen::worker`).

use std::ffi::{CString, OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::io::RawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::{diag, environ, exit, sys};

static IN_PROCESS: AtomicBool = AtomicBool::new(false);

/// Lets [`exec`] continue with a sibling program in this process. A link calls it with
/// `true` when its memory holds nothing the next program must not see (tcpsplice-listen's
/// forked child, tcpsplice-dial), and with `false` when it does: tcpsplice-auth always
/// execs for real, so the users file and what it parsed vanish with its image.
pub fn allow_in_process(on: bool) {
    IN_PROCESS.store(on, Ordering::Relaxed);
}

/// Descriptors of the process that runs the chain, which a sibling continuing in it
/// must neither inherit nor close (tcpsplice-listen's channel to its connection process).
static RESERVED: Mutex<Vec<RawFd>> = Mutex::new(Vec::new());

/// Set when the process holds no close-on-exec descriptor but the reserved ones, so the
/// next in-process continuation need not look for any. Cleared by that continuation.
static NOTHING_TO_CLOSE: AtomicBool = AtomicBool::new(false);

/// Says that this process holds no close-on-exec descriptor but the reserved ones (a
/// reused connection process has just closed everything else; tcpsplice-dial has closed
/// all it opened but the connection), so the next sibling that continues in it need not
/// scan the descriptor table.
pub fn nothing_to_close() {
    NOTHING_TO_CLOSE.store(true, Ordering::Relaxed);
}

/// Reserves `fds` for the process that runs the chain: [`exec`] keeps them open for a
/// sibling continuing in-process (a real exec closes them, they are close-on-exec), and
/// [`is_reserved`] tells the sibling they are not its own.
pub fn reserve_fds(fds: &[RawFd]) {
    *RESERVED.lock().unwrap_or_else(|e| e.into_inner()) = fds.to_vec();
}

/// Reserves one more descriptor, made by a program continuing in this process, that the
/// process keeps for the next connection (tcpsplice's signalfd): hidden from the
/// programs as [`reserve_fds`]'s are, and kept open between connections.
pub fn reserve_more(fd: RawFd) {
    let mut list = RESERVED.lock().unwrap_or_else(|e| e.into_inner());
    if !list.contains(&fd) {
        list.push(fd);
    }
}

/// The reserved descriptors (see [`reserve_fds`], [`reserve_more`]).
pub fn reserved() -> Vec<RawFd> {
    with_reserved(<[RawFd]>::to_vec)
}

/// Calls `f` with the reserved descriptors, without the copy [`reserved`] makes: asked
/// at every connection.
pub fn with_reserved<R>(f: impl FnOnce(&[RawFd]) -> R) -> R {
    f(&RESERVED.lock().unwrap_or_else(|e| e.into_inner()))
}

/// Reserved descriptors go this high, out of the way of the fixed numbers a chain uses
/// (0, 1, 2, 6, 7) and of the low numbers its sockets and pipes get.
pub const RESERVED_MIN: RawFd = 10;

/// Set once a sibling has continued in this process.
static CONTINUED: AtomicBool = AtomicBool::new(false);

/// Whether the running program continues a link in this process rather than having
/// been exec'd: what it keeps for its process's life may then serve another connection.
pub fn continued_in_process() -> bool {
    CONTINUED.load(Ordering::Relaxed)
}

/// Whether `fd` belongs to the process running the chain rather than to the program:
/// a program told to use it must treat it as not open, as it would be after an exec.
pub fn is_reserved(fd: RawFd) -> bool {
    RESERVED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .contains(&fd)
}

/// Descriptors that this process alone holds, its own connection sockets (the one
/// tcpsplice-listen's connection process was handed, the one tcpsplice-dial made): no
/// other process sees their file status flags, and they are closed when the chain
/// ends, so tcpsplice need not put back the O_NONBLOCK it sets on them, nor ask what
/// they are: each entry says which socket it is a descriptor of.
static PRIVATE: Mutex<Vec<(RawFd, Private)>> = Mutex::new(Vec::new());

/// What the link that said a descriptor is this process's alone knows of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Private {
    /// Descriptors said together are one socket and have the same number here;
    /// descriptors said apart are different sockets.
    pub socket: u32,
    /// Left non-blocking for the next link, which continues in this process and sets
    /// O_NONBLOCK anyway ([`private_nonblocking_fds`]); false when not known.
    pub nonblocking: bool,
}

static NEXT_SOCKET: AtomicU32 = AtomicU32::new(0);

/// Says that `fds`, descriptors of one socket, are this process's alone (see
/// [`PRIVATE`]) until [`forget_private`]. A real exec forgets it too: the statics go
/// with the image.
pub fn private_fds(fds: &[RawFd]) {
    say_private(fds, false);
}

/// As [`private_fds`], for a socket left with O_NONBLOCK set because the next link
/// continues in this process and would set it itself. Should the next program be
/// exec'd after all (its image replaced since it was asked), [`exec`] clears the flag
/// first: a program exec'd gets the blocking descriptors DESIGN.md promises.
pub fn private_nonblocking_fds(fds: &[RawFd]) {
    say_private(fds, true);
}

fn say_private(fds: &[RawFd], nonblocking: bool) {
    let p = Private {
        socket: NEXT_SOCKET.fetch_add(1, Ordering::Relaxed),
        nonblocking,
    };
    let mut list = PRIVATE.lock().unwrap_or_else(|e| e.into_inner());
    // A descriptor said again (a second dialer in the chain) is now the new socket.
    list.retain(|(fd, _)| !fds.contains(fd));
    list.extend(fds.iter().map(|&fd| (fd, p)));
}

/// What was said of `fd`, if it was said to be this process's alone.
pub fn private(fd: RawFd) -> Option<Private> {
    PRIVATE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .find(|(f, _)| *f == fd)
        .map(|&(_, p)| p)
}

/// Whether `fd` was said to be this process's alone.
pub fn is_private(fd: RawFd) -> bool {
    private(fd).is_some()
}

/// Forgets what [`private_fds`] said, when the connection's descriptors are closed.
pub fn forget_private() {
    PRIVATE.lock().unwrap_or_else(|e| e.into_inner()).clear();
}

/// Before a real exec: the descriptors left non-blocking for an in-process link get
/// their blocking mode back, as the program exec'd expects it.
fn blocking_again() {
    let list = PRIVATE.lock().unwrap_or_else(|e| e.into_inner());
    for &(fd, p) in list.iter() {
        if p.nonblocking {
            let _ = sys::set_nonblocking(fd, false);
        }
    }
}

/// A program's `main`: its command line without its name in, its exit status out.
pub type Entry = fn(&[OsString]) -> i32;
/// A program's parse of its command line ahead of any connection ([`parse_ahead`]):
/// the words after its name in, what it keeps of them for its connections' runs, and
/// the command line of the program it will run next out (None: it runs none, or it
/// cannot tell before a connection comes).
pub type ParseAhead = fn(&[OsString], &mut Ahead) -> Option<Vec<OsString>>;

/// A sibling program: the name it is installed under, its `main` and its
/// [`ParseAhead`] (None: it parses its options for each connection).
#[derive(Clone, Copy)]
pub struct Program {
    pub name: &'static str,
    pub main: Entry,
    pub parse_ahead: Option<ParseAhead>,
}
type Sibling = Option<Program>;

/// What the links before one will have put in the environment, as far as a link's
/// parse depends on it: [`parse_ahead`] runs in the supervisor, before any of them.
#[derive(Default)]
pub struct Ahead {
    /// TCPSPLICE_TARGET is set: a link before chose the target (tcpsplice-auth).
    pub target_chosen: bool,
}

/// Parses ahead, in tcpsplice-listen before its first fork, the command line of every
/// link of `argv` that will continue in the connection processes, as each will parse
/// it for a connection: what a link keeps of its parse (`args::ParsedOnce`) is then
/// read from the supervisor's memory by every connection process, not built again by
/// each one. Why: the parse (getopts' table, a copy of every option's description and
/// of every word) was some 150 allocations per connection process, and what it left
/// spread over 2 of the 6 heap pages an idle connection's process owns. Stops at the
/// first link that is exec'd or has no parse ahead. Only for a chain that passed its
/// check: a parse that fails exits, and here it would take the supervisor with it.
pub fn parse_ahead(argv: &[OsString]) {
    let mut words = argv.to_vec();
    let mut ahead = Ahead::default();
    while let Some(first) = words.first() {
        if continues_as(first).is_none() {
            return;
        }
        let Some(parse) = sibling(first).and_then(|p| p.parse_ahead) else {
            return;
        };
        match parse(&words[1..], &mut ahead) {
            Some(next) => words = next,
            None => return,
        }
    }
}

/// The programs of the installation, handed over by the binary's `main`
/// (`tcpsplice::run`); none until then, so that every program is exec'd.
static PROGRAMS: Mutex<&'static [Program]> = Mutex::new(&[]);

/// Tells the chain which programs may continue in this process.
pub fn set_siblings(programs: &'static [Program]) {
    *PROGRAMS.lock().unwrap_or_else(|e| e.into_inner()) = programs;
}

/// What [`sibling`] found for each program name asked about. tcpsplice-listen fills it
/// before it forks ([`resolve_ahead`]), so its children decide without a syscall.
static SIBLINGS: Mutex<Vec<(OsString, Sibling)>> = Mutex::new(Vec::new());

/// Works out now, for every word of `argv` that names a sibling program, whether it is
/// one, so that processes forked later inherit the answers.
pub fn resolve_ahead(argv: &[OsString]) {
    for a in argv {
        sibling(a);
    }
}

/// The sibling that [`exec`] of `prog` would continue with in this process, and that
/// could come back: None when it would be exec'd.
pub fn continues_as(prog: &OsStr) -> Option<&'static str> {
    if !IN_PROCESS.load(Ordering::Relaxed) || exec_always() {
        return None;
    }
    sibling(prog).map(|p| p.name)
}

/// Set for one run of the chain by tcpsplice-listen before it listens: every link
/// checks its options and files and the rest of its command line, then exits 0 or
/// with the message and code it would fail with when a client came.
pub const CHECK_VAR: &str = "TCPSPLICE_CHECK";

/// Whether this is such a check run.
pub fn checking() -> bool {
    environ::with_var(CHECK_VAR, |v| v.is_some_and(|v| v == "1"))
}

/// In a check run, what [`exec`] of `argv` would meet: a sibling program is checked in
/// this process (its options and files, then the rest of the chain); any other program
/// is only looked for, as execvp would (it has no check mode, so it is not run).
/// Returns 0, or exits 127 or 126 with exec's message.
pub fn check(argv: &[OsString]) -> i32 {
    let Some(first) = argv.first() else {
        diag::die(exit::USAGE, "no program to run");
    };
    if let Some(p) = sibling(first) {
        diag::init(p.name);
        return (p.main)(&argv[1..]);
    }
    let shown = first.to_string_lossy();
    match search_path(first) {
        Some(p) if is_executable(&p) => exit::OK,
        Some(p) if p.exists() => diag::die(
            exit::NOEXEC,
            &format!("unable to run {shown}: Permission denied"),
        ),
        _ => diag::die(
            exit::NOTFOUND,
            &format!("unable to run {shown}: No such file or directory"),
        ),
    }
}

/// Whether `prog` is a sibling program of this installation (so it has a check mode).
pub fn is_sibling(prog: &OsStr) -> bool {
    sibling(prog).is_some()
}

/// What to send the client if the exec of the next program fails: the protocol's
/// failure reply, when the client still waits for one (set by tcpsplice-auth).
static EXEC_FAILURE_REPLY: Mutex<Vec<u8>> = Mutex::new(Vec::new());

/// Sets the reply [`exec`] sends on fd 1 when the next program cannot be run.
pub fn reply_on_exec_failure(reply: Vec<u8>) {
    *EXEC_FAILURE_REPLY.lock().unwrap_or_else(|e| e.into_inner()) = reply;
}

fn exec_always() -> bool {
    environ::with_var("TCPSPLICE_EXEC", |v| v.is_some_and(|v| v == "always"))
}

/// Execs `argv` (searching PATH for `argv[0]`) with SIGPIPE back at its default and no
/// signal blocked, as the next program expects to inherit them (a signal mask survives
/// exec, and a signalfd user blocks what it reads). A failure exits 127 when the program
/// was not found and 126 otherwise. Returns only when a sibling ran in this process and
/// ended normally: with the exit status it asks for.
pub fn exec(argv: &[OsString]) -> i32 {
    let Some(first) = argv.first() else {
        diag::die(exit::USAGE, "no program to run");
    };
    // Taken now: it is for this step only, not for a later one of this process.
    let reply = std::mem::take(&mut *EXEC_FAILURE_REPLY.lock().unwrap_or_else(|e| e.into_inner()));
    sys::unblock_all_signals();
    if IN_PROCESS.load(Ordering::Relaxed) && !exec_always() {
        // Asked again (within a second) each time, as the answer about the sibling was
        // kept from before: after an upgrade, the new programs are what must run.
        if let Some(p) = sibling(first).filter(|_| !image_replaced()) {
            // SIGPIPE stays ignored: every sibling ignores it first thing (as every
            // program of the suite does), so setting the default here would only be
            // undone by the next syscall.
            become_sibling(p.name);
            return (p.main)(&argv[1..]);
        }
    }
    sys::signal_ignore(libc::SIGPIPE, false);
    blocking_again();
    exec_image(argv, &reply)
}

/// The exec proper, and its failure. Never inlined: a sibling continuing in this process
/// runs below [`exec`]'s frame, and under tcpsplice-listen what the chain holds on the
/// stack while a connection is idle is private memory of its process.
#[inline(never)]
fn exec_image(argv: &[OsString], reply: &[u8]) -> ! {
    let Some(first) = argv.first() else {
        diag::die(exit::USAGE, "no program to run");
    };
    let cargs: Result<Vec<CString>, _> = argv
        .iter()
        .map(|a| CString::new(a.as_bytes().to_vec()))
        .collect();
    let Ok(cargs) = cargs else {
        diag::die(exit::USAGE, "a program argument contains a NUL byte");
    };
    // With no PATH, a sibling named bare is run from beside this binary.
    let beside = beside_self(first).and_then(|p| CString::new(p.into_os_string().into_vec()).ok());
    // exec passes on the C library's environment: the changes the links made must be
    // in it now (the process is replaced, so what setenv keeps costs nothing after).
    environ::make_real();
    let err = match beside {
        Some(file) => sys::execv(&file, &cargs),
        None => sys::execvp(&cargs),
    };
    let code = if err.raw_os_error() == Some(libc::ENOENT) {
        exit::NOTFOUND
    } else {
        exit::NOEXEC
    };
    // A client waiting for its answer gets the protocol's failure, not a bare close.
    if !reply.is_empty() && sys::write_all(1, reply).is_ok() {
        let _ = sys::shutdown(1, libc::SHUT_WR);
    }
    diag::die_sys(code, &format!("run {}", first.to_string_lossy()), &err)
}

/// The sibling program `prog` names, if it is one: a known name that resolves (as
/// execvp would resolve it) to a file in the directory of the running binary.
// Out of line, like `exec_image`: a sibling runs below `exec`'s frame.
#[inline(never)]
fn sibling(prog: &OsStr) -> Sibling {
    let mut known = SIBLINGS.lock().unwrap_or_else(|e| e.into_inner());
    // Asked first: only names of programs are kept, so an answer found stands, and
    // every link of every connection asks about a name resolved before the fork.
    if let Some((_, found)) = known.iter().find(|(p, _)| p == prog) {
        return *found;
    }
    let base = Path::new(prog).file_name()?.as_bytes();
    let programs: &[Program] = *PROGRAMS.lock().unwrap_or_else(|e| e.into_inner());
    let program = *programs.iter().find(|p| p.name.as_bytes() == base)?;
    let found = same_directory(prog).then_some(program);
    known.push((prog.to_os_string(), found));
    found
}

/// Whether the running binary was replaced (or removed) since it started: a sibling
/// must then be exec'd, so that the new one runs, not our old copy of it.
// Out of line, like `exec_image`: a sibling runs below `exec`'s frame.
#[inline(never)]
fn image_replaced() -> bool {
    // Looked up at most once a second: a reused connection process asks at every link
    // of every connection, and the path walk through /proc costs more than the rest of
    // the step. An upgrade then takes effect within the second.
    static LAST: Mutex<Option<(Instant, bool)>> = Mutex::new(None);
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    let now = Instant::now();
    if let Some((at, replaced)) = *last {
        if now.saturating_duration_since(at) < IMAGE_RECHECK {
            return replaced;
        }
    }
    let replaced = std::fs::read_link("/proc/self/exe").map_or(true, |here| is_deleted(&here));
    *last = Some((now, replaced));
    replaced
}

/// How long [`image_replaced`] trusts its last answer.
const IMAGE_RECHECK: Duration = Duration::from_secs(1);

fn is_deleted(exe: &Path) -> bool {
    exe.as_os_str().as_bytes().ends_with(b" (deleted)")
}

fn same_directory(prog: &OsStr) -> bool {
    let Ok(here) = std::fs::read_link("/proc/self/exe") else {
        return false;
    };
    if is_deleted(&here) {
        return false;
    }
    let Some(there) = search_path(prog).and_then(|p| std::fs::canonicalize(p).ok()) else {
        return false;
    };
    there.parent().is_some() && there.parent() == here.parent() && is_elf(&there)
}

/// Whether `p` is a compiled program: a wrapper script of the same name (one that adds
/// options, say) must be exec'd, not skipped for the built-in program.
fn is_elf(p: &Path) -> bool {
    let mut magic = [0u8; 4];
    std::fs::File::open(p)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok()
        && magic == *b"\x7fELF"
}

/// Where [`exec`] finds `prog`: as execvp would, but for a sibling named bare when no
/// PATH is set (inetd removes it), which is the file beside the running binary.
fn search_path(prog: &OsStr) -> Option<PathBuf> {
    if prog.as_bytes().contains(&b'/') {
        return Some(PathBuf::from(prog));
    }
    if let Some(p) = beside_self(prog) {
        return Some(p);
    }
    let path = environ::var_os("PATH").unwrap_or_else(|| "/bin:/usr/bin".into());
    std::env::split_paths(&path)
        .map(|dir| dir.join(prog))
        .find(|p| is_executable(p))
}

/// With no PATH in the environment, a program of the installation named without a
/// directory (`tcpsplice`) is the executable file of that name beside the running binary:
/// execvp's default path (/bin:/usr/bin) would miss a suite installed in /usr/local/bin.
fn beside_self(prog: &OsStr) -> Option<PathBuf> {
    if environ::with_var("PATH", |v| v.is_some()) || prog.as_bytes().contains(&b'/') {
        return None;
    }
    let programs: &[Program] = *PROGRAMS.lock().unwrap_or_else(|e| e.into_inner());
    programs
        .iter()
        .find(|p| p.name.as_bytes() == prog.as_bytes())?;
    let here = std::fs::read_link("/proc/self/exe").ok()?;
    let p = here.parent()?.join(prog);
    is_executable(&p).then_some(p)
}

fn is_executable(p: &Path) -> bool {
    sys::is_executable(p)
}

/// Leaves the process as an exec would have: descriptors marked close-on-exec closed
/// (a listening socket, a signalfd), and the new name in ps and top.
// Out of line, like `exec_image`: a sibling runs below `exec`'s frame.
#[inline(never)]
fn become_sibling(name: &'static str) {
    // The C library's syslog socket is close-on-exec too: closed behind its back, its
    // number could be reused by a connection, and the next message sent into it.
    diag::forget_syslog();
    CONTINUED.store(true, Ordering::Relaxed);
    if !NOTHING_TO_CLOSE.swap(false, Ordering::Relaxed) {
        let reserved = RESERVED.lock().unwrap_or_else(|e| e.into_inner()).clone();
        sys::close_cloexec_fds(&reserved);
    }
    sys::set_process_name(name);
    diag::init(name);
}
