//! Memory shared by a process tree: an anonymous shared mapping made before the forks,
//! and the futex calls that let its processes wait on a word of it. tcpsplice-listen's
//! connection processes share tcpsplice-auth's verified-login cache and its bound on
//! password checks this way (see `auth::loginstate`); nothing of it is in a file or
//! the environment, and a real exec leaves it behind.
//!
//! Syscall-level code, as `sys` is: the mapping through nix, the futex by hand (nix
//! has no futex call), and every `unsafe` block of it here.

use std::io;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

/// Types that are valid when every byte is zero and that may be shared between
/// processes: atomics, and arrays and `repr(C)` structs of them.
///
/// # Safety
/// An implementor must be valid as all-zero bytes and hold no pointer: every process
/// sees the mapping at the same address, but a pointer into a process's private memory
/// would mean nothing in another one.
pub unsafe trait Zeroable: Sync {}

// SAFETY: atomics are valid as zero bytes and hold no pointer.
unsafe impl Zeroable for AtomicU32 {}
// SAFETY: as above.
unsafe impl Zeroable for AtomicU64 {}
// SAFETY: an array of zero-valid, pointer-free elements is zero-valid and pointer-free.
unsafe impl<T: Zeroable, const N: usize> Zeroable for [T; N] {}

/// Maps a zeroed `T` shared with every process forked from now on. The mapping lives
/// until the process exits (or execs).
pub fn shared<T: Zeroable>() -> io::Result<&'static T> {
    use nix::sys::mman::{mmap_anonymous, MapFlags, ProtFlags};
    let len = NonZeroUsize::new(std::mem::size_of::<T>()).unwrap_or(NonZeroUsize::MIN);
    let prot = ProtFlags::PROT_READ | ProtFlags::PROT_WRITE;
    // SAFETY: a new anonymous mapping; no address is given, so nothing is replaced.
    let p = unsafe { mmap_anonymous(None, len, prot, MapFlags::MAP_SHARED) }?;
    // SAFETY: the mapping is page-aligned (so aligned for T), `len` bytes long, zeroed
    // by the kernel, which T: Zeroable says is a valid T, and never unmapped: 'static.
    Ok(unsafe { p.cast::<T>().as_ref() })
}

/// Maps `n` zeroed `T`s (at least one), shared with every process forked from now on, as
/// [`shared`] does.
pub fn shared_slice<T: Zeroable>(n: usize) -> io::Result<&'static [T]> {
    use nix::sys::mman::{mmap_anonymous, MapFlags, ProtFlags};
    let n = n.max(1);
    let bytes = std::mem::size_of::<T>()
        .checked_mul(n)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
    let len = NonZeroUsize::new(bytes).unwrap_or(NonZeroUsize::MIN);
    let prot = ProtFlags::PROT_READ | ProtFlags::PROT_WRITE;
    // SAFETY: a new anonymous mapping; no address is given, so nothing is replaced.
    let p = unsafe { mmap_anonymous(None, len, prot, MapFlags::MAP_SHARED) }?;
    // SAFETY: as in `shared`: page-aligned, `n` zeroed T's long, never unmapped.
    Ok(unsafe { std::slice::from_raw_parts(p.cast::<T>().as_ptr(), n) })
}

/// Runs `f` holding the lock `word` (0 when free, else the holder's pid) against the
/// other processes sharing it. For steps of a few loads and stores: a process finding it
/// held yields and tries again, and a holder that died in it (killed between two
/// instructions) is taken over.
pub fn locked<T>(word: &AtomicU32, f: impl FnOnce() -> T) -> T {
    acquire(word, None);
    let out = f();
    word.store(0, Ordering::Release);
    out
}

/// [`locked`], giving up after about `tries` attempts (None then, `f` not run): for a
/// process that must not wait on a holder only it could clear (the supervisor, which
/// reaps a holder that died: a zombie looks alive).
pub fn try_locked<T>(word: &AtomicU32, tries: u32, f: impl FnOnce() -> T) -> Option<T> {
    if !acquire(word, Some(tries)) {
        return None;
    }
    let out = f();
    word.store(0, Ordering::Release);
    Some(out)
}

/// Takes the lock `word` for this process, trying at most `tries` times if given.
fn acquire(word: &AtomicU32, tries: Option<u32>) -> bool {
    let me = pid();
    let mut tried = 0u32;
    loop {
        match word.compare_exchange(0, me, Ordering::Acquire, Ordering::Relaxed) {
            Ok(_) => return true,
            Err(owner) if !alive(owner) => {
                let _ = word.compare_exchange(owner, 0, Ordering::Relaxed, Ordering::Relaxed);
            }
            Err(_) if tries.is_some_and(|t| tried >= t) => return false,
            // A holder that is stopped, or dead but not reaped yet, holds on longer
            // than a few yields: then wait without spinning.
            Err(_) if tried >= 64 => std::thread::sleep(Duration::from_micros(200)),
            Err(_) => std::thread::yield_now(),
        }
        tried = tried.saturating_add(1);
    }
}

/// Sleeps while `word` holds `expected`, at most `timeout`, until a [`wake`] on it
/// (from any process sharing it). Returns at once if the word has already changed;
/// may also return early (a signal, a spurious wakeup): callers look again.
pub fn wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: FUTEX_WAIT reads the u32 at `word` (an AtomicU32 has u32's layout) and the
    // timespec we own. Not FUTEX_PRIVATE: the word is shared between processes.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
        )
    };
}

/// Wakes up to `n` processes sleeping in [`wait`] on `word`.
pub fn wake(word: &AtomicU32, n: i32) {
    // SAFETY: FUTEX_WAKE only uses the address of `word` as a key.
    unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, n) };
}

/// Whether process `pid` exists (kill with signal 0: only ESRCH says it does not).
pub fn alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    let sent = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None);
    sent != Err(nix::errno::Errno::ESRCH)
}

/// This process's id, as the owner mark in a shared word. Asked of the kernel once per
/// process (a reused connection process takes a lock for every connection): a fork
/// forgets it in the child (`forget_pid`, run by fork(3) in the child), which asks again.
pub fn pid() -> u32 {
    match PID.load(Ordering::Relaxed) {
        0 => {
            static FORGET_ON_FORK: std::sync::Once = std::sync::Once::new();
            static HOOKED: AtomicU32 = AtomicU32::new(0);
            FORGET_ON_FORK.call_once(|| {
                // SAFETY: registers a handler that only stores to an atomic, which is
                // async-signal-safe, as a handler run in a forked child must be.
                if unsafe { libc::pthread_atfork(None, None, Some(forget_pid)) } == 0 {
                    HOOKED.store(1, Ordering::Relaxed);
                }
            });
            let me = std::process::id();
            // Without the handler (no memory for it), a child would keep our id.
            if HOOKED.load(Ordering::Relaxed) == 1 {
                PID.store(me, Ordering::Relaxed);
            }
            me
        }
        me => me,
    }
}

/// What [`pid`] found, 0 before it asked (and in a child forked since).
static PID: AtomicU32 = AtomicU32::new(0);

/// fork(3)'s child handler: the parent's id is not the child's.
extern "C" fn forget_pid() {
    PID.store(0, Ordering::Relaxed);
}

/// Milliseconds of CLOCK_MONOTONIC: the same clock in every process of the machine,
/// unlike `Instant`, which cannot be put in shared memory.
pub fn monotonic_ms() -> u64 {
    use nix::time::{clock_gettime, ClockId};
    // CLOCK_MONOTONIC always exists; the error is only there for other clocks.
    let Ok(ts) = clock_gettime(ClockId::CLOCK_MONOTONIC) else {
        return 0;
    };
    (ts.tv_sec() as u64) * 1000 + (ts.tv_nsec() as u64) / 1_000_000
}

/// Fills `buf` from the kernel's random number generator (getrandom(2), through the
/// `getrandom` crate, which retries EINTR and short reads).
pub fn random(buf: &mut [u8]) -> io::Result<()> {
    Ok(getrandom::fill(buf)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forked_child_has_its_own_pid() {
        assert_eq!(pid(), std::process::id());
        assert_eq!(pid(), std::process::id());
        // SAFETY: the child only loads atomics, asks for its id and exits.
        let child = unsafe { libc::fork() };
        assert!(child >= 0);
        if child == 0 {
            let ok = pid() == std::process::id() && pid() == std::process::id();
            // SAFETY: exiting the child without running the parent's atexit handlers.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        let mut status = 0;
        // SAFETY: waits for the child just forked, into a local.
        assert_eq!(unsafe { libc::waitpid(child, &mut status, 0) }, child);
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
        assert_eq!(pid(), std::process::id());
    }
}
