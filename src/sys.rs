//! The syscall layer. The suite's system calls are made here, through `nix` where it has
//! them, so errno becomes an `io::Error` in one place. The functions keep taking
//! descriptor numbers, as the C calls did: [`borrow`] lends one to a nix call for that
//! call only. What nix does not cover is called by hand through [`cvt`]. Every `unsafe`
//! block lives here or in a module that says why it cannot.

use std::ffi::CStr;
use std::io;
use std::io::{IoSlice, IoSliceMut};
use std::mem::size_of;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::io::{BorrowedFd, IntoRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::Mutex;

use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag, SpliceFFlags};
use nix::sys::signal::{SigHandler, SigSet, Signal};
use nix::sys::socket::{
    sockopt, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
    SockaddrIn, SockaddrIn6, SockaddrLike, SockaddrStorage,
};

/// Turns a C-style `-1 means errno` return into a `Result`.
pub fn cvt<T: Copy + PartialEq + From<i8>>(ret: T) -> io::Result<T> {
    if ret == T::from(-1) {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Lends descriptor `fd` to one nix call. The functions here take descriptor numbers,
/// as the C calls they wrap did, and hold the borrow only for the call they make with it.
/// -1, which a `BorrowedFd` cannot hold, and other negative numbers give EBADF, as the
/// kernel would.
fn borrow(fd: &RawFd) -> io::Result<BorrowedFd<'_>> {
    if *fd < 0 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    // SAFETY: not -1 (checked). The number is the caller's, open for the one call the
    // borrow is passed to, as it had to be for the C call; one that is not open makes
    // that call fail with EBADF, as the C call would, and nothing else is done with it.
    Ok(unsafe { BorrowedFd::borrow_raw(*fd) })
}

/// Retries a call that failed with EINTR.
pub fn retry<T, F: FnMut() -> io::Result<T>>(mut f: F) -> io::Result<T> {
    loop {
        match f() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    Ok(nix::sys::stat::fstat(borrow(&fd)?)?)
}

/// What kind of file an fd refers to; decides splice, shutdown and close behaviour.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FdKind {
    Socket,
    Pipe,
    Regular,
    Other,
}

/// The kind of file behind `fd`, or an error if `fd` is not open.
pub fn fd_kind(fd: RawFd) -> io::Result<FdKind> {
    fd_identity(fd).map(|(kind, _)| kind)
}

/// The kind of file behind `fd` and its identity (device, inode): two descriptors with
/// the same identity are the same socket, pipe or file.
pub fn fd_identity(fd: RawFd) -> io::Result<(FdKind, (u64, u64))> {
    let st = fstat(fd)?;
    let kind = match st.st_mode & libc::S_IFMT {
        libc::S_IFSOCK => FdKind::Socket,
        libc::S_IFIFO => FdKind::Pipe,
        libc::S_IFREG => FdKind::Regular,
        _ => FdKind::Other,
    };
    Ok((kind, (st.st_dev, st.st_ino)))
}

/// The descriptor flags of `fd` (FD_CLOEXEC).
fn fd_flags(fd: RawFd) -> io::Result<FdFlag> {
    Ok(FdFlag::from_bits_retain(fcntl(
        borrow(&fd)?,
        FcntlArg::F_GETFD,
    )?))
}

/// Whether `fd` is open at all.
pub fn fd_is_open(fd: RawFd) -> bool {
    fd_flags(fd).is_ok()
}

/// The file status flags of `fd` (O_NONBLOCK, O_APPEND, ...).
pub fn get_fl(fd: RawFd) -> io::Result<libc::c_int> {
    Ok(fcntl(borrow(&fd)?, FcntlArg::F_GETFL)?)
}

/// Sets the file status flags of `fd`.
pub fn set_fl(fd: RawFd, flags: libc::c_int) -> io::Result<()> {
    let flags = OFlag::from_bits_retain(flags);
    fcntl(borrow(&fd)?, FcntlArg::F_SETFL(flags))?;
    Ok(())
}

/// Turns O_NONBLOCK on or off and returns the flags as they were before, so a caller can
/// put back what it found on a descriptor it shares with its parent (a shell's tty).
pub fn set_nonblocking(fd: RawFd, on: bool) -> io::Result<libc::c_int> {
    let old = get_fl(fd)?;
    let new = if on {
        old | libc::O_NONBLOCK
    } else {
        old & !libc::O_NONBLOCK
    };
    if new != old {
        set_fl(fd, new)?;
    }
    Ok(old)
}

/// Sets or clears FD_CLOEXEC.
pub fn set_cloexec(fd: RawFd, on: bool) -> io::Result<()> {
    let old = fd_flags(fd)?;
    let mut new = old;
    new.set(FdFlag::FD_CLOEXEC, on);
    if new != old {
        fcntl(borrow(&fd)?, FcntlArg::F_SETFD(new))?;
    }
    Ok(())
}

/// Moves `from` onto `to` with close-on-exec cleared. When `from == to`, dup2 would do
/// nothing and leave FD_CLOEXEC as it was, so it is cleared explicitly.
pub fn fd_move(to: RawFd, from: RawFd) -> io::Result<()> {
    if to == from {
        return set_cloexec(to, false);
    }
    fd_copy(to, from)?;
    close(from);
    Ok(())
}

/// Makes `to` a copy of `from` with close-on-exec cleared.
pub fn fd_copy(to: RawFd, from: RawFd) -> io::Result<()> {
    if to == from {
        return set_cloexec(to, false);
    }
    // By hand: nix's dup2 takes the target as an OwnedFd to replace, which a number that
    // is not open yet (fd 6 before tcpsplice-dial moves its socket there) cannot be, and
    // its dup2_raw makes an OwnedFd of the result unchecked, even of -1.
    touch(to);
    // SAFETY: dup2 takes two integers; the new fd has FD_CLOEXEC clear.
    retry(|| cvt(unsafe { libc::dup2(from, to) })).map(drop)
}

/// Closes `fd`, ignoring errors: there is nothing useful to do about a failed close of a
/// descriptor we are done with.
pub fn close(fd: RawFd) {
    touch(fd);
    // Callers never close a descriptor owned by a Rust object.
    let _ = nix::unistd::close(fd);
}

/// Descriptors a reused connection process must find as they were at its fork (fd 2 and
/// those inherited from the supervisor's parent), said by [`watch_fds`].
static WATCHED: Mutex<Vec<RawFd>> = Mutex::new(Vec::new());

/// Whether one of the [`WATCHED`] descriptors may have changed: one was closed or had
/// another copied onto it here, or none was said yet.
static WATCHED_TOUCHED: AtomicBool = AtomicBool::new(true);

/// Says that `fds` are open and what they should stay: [`watched_untouched`] then tells
/// whether any may have changed since, without a syscall. A descriptor that is open
/// changes only when it is closed or replaced first, and every close, dup2 and
/// close_range of the suite is made here; the C library closes only what it opened
/// itself, and an OwnedFd only the number it was given when that was free, so neither
/// can be a watched one unless it was closed here first.
pub fn watch_fds(fds: &[RawFd]) {
    *WATCHED.lock().unwrap_or_else(|e| e.into_inner()) = fds.to_vec();
    WATCHED_TOUCHED.store(false, Ordering::Relaxed);
}

/// Whether no descriptor said by [`watch_fds`] was closed or replaced since it was said.
pub fn watched_untouched() -> bool {
    !WATCHED_TOUCHED.load(Ordering::Relaxed)
}

fn touch(fd: RawFd) {
    touch_range(fd, fd);
}

fn touch_range(from: RawFd, upto: RawFd) {
    if WATCHED_TOUCHED.load(Ordering::Relaxed) {
        return;
    }
    let watched = WATCHED.lock().unwrap_or_else(|e| e.into_inner());
    if watched.iter().any(|&w| (from..=upto).contains(&w)) {
        WATCHED_TOUCHED.store(true, Ordering::Relaxed);
    }
}

/// Creates a pipe with both ends O_NONBLOCK and O_CLOEXEC: (read end, write end).
pub fn pipe_nonblocking() -> io::Result<(RawFd, RawFd)> {
    let (r, w) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
    Ok((r.into_raw_fd(), w.into_raw_fd()))
}

/// An allocator for what only the forking process uses, in memory its forked children
/// do not get: each block is an anonymous mapping of its own marked MADV_DONTFORK. Why:
/// tcpsplice-listen writes its books of connection processes after every fork, and a
/// page it writes that a child still shares becomes a private copy of that child (the
/// page of the books' table written at each insert: 4 KiB of every idle connection,
/// /proc/PID/pagemap, 2026-12-02). A child must never touch such a block, not even to
/// drop what holds it: there is nothing mapped there in the child.
#[derive(Clone, Copy, Debug, Default)]
pub struct NotForked;

impl NotForked {
    /// The length mapped for `size` bytes: whole pages (and none for nothing).
    fn mapped_len(size: usize) -> Option<usize> {
        Some(size.checked_add(NOT_FORKED_PAGE - 1)? & !(NOT_FORKED_PAGE - 1))
    }
}

/// The page size [`NotForked`] maps in (its blocks' largest alignment too).
const NOT_FORKED_PAGE: usize = 4096;

// SAFETY: a block is a mapping of its own, valid (and not moved) until `deallocate`
// unmaps it; the value is a unit, so every copy of it is the same allocator and can
// free what another copy allocated.
unsafe impl allocator_api2::alloc::Allocator for NotForked {
    fn allocate(
        &self,
        layout: std::alloc::Layout,
    ) -> Result<std::ptr::NonNull<[u8]>, allocator_api2::alloc::AllocError> {
        use allocator_api2::alloc::AllocError;
        use nix::sys::mman::{madvise, mmap_anonymous, munmap, MapFlags, MmapAdvise, ProtFlags};
        if layout.align() > NOT_FORKED_PAGE {
            return Err(AllocError);
        }
        let len = Self::mapped_len(layout.size()).ok_or(AllocError)?;
        let Some(mapped) = std::num::NonZeroUsize::new(len) else {
            // Nothing to map: a dangling pointer of the alignment asked, as for a ZST.
            let dangling = std::ptr::NonNull::new(layout.align() as *mut u8).ok_or(AllocError)?;
            return Ok(std::ptr::NonNull::slice_from_raw_parts(dangling, 0));
        };
        // SAFETY: a new anonymous private mapping at an address the kernel picks: no
        // memory that exists is touched.
        let p = unsafe {
            mmap_anonymous(
                None,
                mapped,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE,
            )
        }
        .map_err(|_| AllocError)?;
        // SAFETY: [p, p + len) is the mapping just made, ours alone.
        if unsafe { madvise(p, len, MmapAdvise::MADV_DONTFORK) }.is_err() {
            // SAFETY: as above; nothing refers to it yet.
            let _ = unsafe { munmap(p, len) };
            return Err(AllocError);
        }
        Ok(std::ptr::NonNull::slice_from_raw_parts(p.cast::<u8>(), len))
    }

    unsafe fn deallocate(&self, ptr: std::ptr::NonNull<u8>, layout: std::alloc::Layout) {
        let Some(len) = Self::mapped_len(layout.size()).filter(|&l| l > 0) else {
            return;
        };
        // SAFETY: the caller hands back a block `allocate` made for this layout (the
        // trait's contract): the whole of one mapping of `len` bytes, no longer used.
        let _ = unsafe { nix::sys::mman::munmap(ptr.cast(), len) };
    }
}

/// How much of the stack below the caller [`release_stack_below`] gives back: more than
/// any set-up of the chain reaches below the relay's frame.
const STACK_RELEASE: usize = 256 * 1024;

/// Most that [`hold_heap_holes`] keeps: more than a supervisor's start-up leaves free
/// (16-20 KiB measured), and a bound should malloc not be the one it expects.
const HOLES_HELD_MAX: usize = 256 * 1024;

/// Takes every free chunk of the main thread's heap below its top, up to malloc's
/// per-thread cache's largest size, and keeps them for good: for a supervisor, once
/// before it forks. Why: a forked connection process allocates from whatever malloc holds
/// free, and a supervisor's start-up (options, environment, names) leaves free chunks on
/// every page of its heap, so each connection process wrote, and so copied, all of them
/// (8 of 8 pages, /proc/PID/pagemap, 2026-12-01). Held, they leave the processes nothing
/// but the top of the heap, past the supervisor's pages, and fresh pages above it. The
/// cost is the free memory of one process, paid once. Returns the bytes held.
///
/// glibc's malloc only (mallinfo2's `keepcost` is the size of the top chunk, which ends
/// at the program break): on another thread, or where a chunk is not from the heap
/// below the break (another malloc preloaded, an arena of its own), it stops there.
pub fn hold_heap_holes() -> usize {
    let mut held = 0;
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc, realloc, free, sbrk(0) and mallinfo2 only ask malloc and the
    // kernel; each probe is either kept unused for ever or handed back with free.
    unsafe {
        if libc::getpid() != libc::gettid() {
            return 0;
        }
        // Room at the top, so that a probe that came from it can grow there in place.
        libc::free(libc::malloc(64 * 1024));
        // Largest first: a large free chunk then goes in large pieces, not in many small.
        for chunk in (32..=1040usize).rev().step_by(16) {
            loop {
                if held >= HOLES_HELD_MAX {
                    return held;
                }
                let info = libc::mallinfo2();
                let brk = libc::sbrk(0) as usize;
                let top = brk.saturating_sub(info.keepcost);
                let p = libc::malloc(chunk - 8);
                if p.is_null() {
                    return held;
                }
                let at = p as usize;
                // Not from glibc's heap below the break (another malloc, or an arena
                // that is not the main one): there is nothing to hold here.
                if info.arena == 0 || at < brk.saturating_sub(info.arena) || at >= brk {
                    libc::free(p);
                    return held;
                }
                if at >= top {
                    // From the top: no hole of this size is left. Freed as it is, the
                    // probe would stay in the per-thread cache, a hole of its own; grown
                    // past the cache's sizes first, it merges back into the top.
                    let grown = libc::realloc(p, 4096);
                    libc::free(if grown.is_null() { p } else { grown });
                    // Where the cache takes larger sizes too (glibc.malloc.tcache_max),
                    // it did not merge: stop before more of these are left.
                    let top_now =
                        (libc::sbrk(0) as usize).saturating_sub(libc::mallinfo2().keepcost);
                    if top_now > at {
                        return held;
                    }
                    break;
                }
                held += chunk;
            }
        }
    }
    held
}

/// Gives the kernel back the heap pages that hold nothing but free chunks (malloc_trim(3)),
/// for a process that will wait a long while with what it has. Under tcpsplice-listen the
/// connection's set-up allocated and freed on pages of the heap it shares with the
/// supervisor, which stay its own until given back: a SOCKS5 connection's idle process
/// kept a page fewer with it (40.3 -> 36.2 KiB of heap, 50 connections, 2026-12-01).
/// Its cost, a walk of malloc's free lists, is paid once per connection that lasts.
///
/// The heap is not made shorter: malloc_trim's other half (sbrk down) writes malloc's
/// state and the C library's break, on a page of its data that the process shared with
/// the supervisor until then, a page for what was mostly never touched (idle forwarded
/// connection, pagemap, 2026-12-02). The top's pages the process touched are given back
/// as the free chunks' are, past the chunk's header ([`release_heap_top`]).
pub fn release_free_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only works on malloc's own state, under its lock; a pad as
    // large as the heap leaves the top as it is.
    unsafe {
        libc::malloc_trim(usize::MAX / 2);
    }
    release_heap_top();
}

/// Gives the kernel back the whole pages of the main heap's top chunk (free memory up to
/// the program break), its header kept, without moving the break. Only where the top is
/// surely malloc's main heap's and nothing else can allocate meanwhile: a process that
/// never started a thread (so glibc has its main arena only, and no other thread
/// mallocs), a top that lies in the heap's mapping and ends at the break (mallinfo2's
/// `keepcost` is its size), and whose header says that size. Else it does nothing.
fn release_heap_top() {
    #[cfg(target_env = "gnu")]
    {
        extern "C" {
            // glibc (2.32 on), <sys/single_threaded.h>: nonzero until the process first
            // creates a thread, and never again after.
            static __libc_single_threaded: libc::c_char;
        }
        // SAFETY: a read of a byte glibc exports for this purpose; glibc writes it only
        // when a thread is created, and then from this thread.
        if unsafe { std::ptr::read_volatile(&raw const __libc_single_threaded) } == 0 {
            return;
        }
        // SAFETY: mallinfo2 and sbrk(0) only ask malloc and the kernel.
        let (info, brk) = unsafe { (libc::mallinfo2(), libc::sbrk(0) as usize) };
        let word = size_of::<usize>();
        if info.keepcost < 4 * word || info.keepcost > info.arena || info.keepcost > brk {
            return;
        }
        let top = brk - info.keepcost;
        let Some(heap_low) = *HEAP_LOW.get_or_init(|| mapping_start(brk - 1)) else {
            return;
        };
        if top < heap_low {
            return;
        }
        // SAFETY: [top, brk) lies in the heap's mapping (checked above), so its second
        // word can be read; a chunk's size, less its flag bits, is in that word.
        let size = unsafe { std::ptr::read((top + word) as *const usize) } & !7;
        if size != info.keepcost {
            return;
        }
        let page = 4096;
        let from = (top + 4 * word + page - 1) & !(page - 1);
        if from < brk {
            // SAFETY: [from, brk) is wholly inside the top chunk past its header: memory
            // malloc holds free and reads nothing from (malloc_trim's madvise of free
            // chunks relies on the same), and no other thread is there to take it.
            unsafe { libc::madvise(from as *mut libc::c_void, brk - from, libc::MADV_DONTNEED) };
        }
    }
}

/// Where the mapping of the main heap (the one that ends at the program break) starts,
/// for [`release_heap_top`]: learnt by a supervisor before it forks
/// ([`learn_heap_mapping`]), else at the first release (None: not found).
static HEAP_LOW: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();

/// Learns where the heap's mapping starts, for [`release_heap_top`], as
/// [`learn_stack_mapping`] does for the stack: once, before the first fork.
pub fn learn_heap_mapping() {
    // SAFETY: sbrk(0) only asks where the break is.
    let brk = unsafe { libc::sbrk(0) } as usize;
    if brk > 0 {
        let _ = HEAP_LOW.get_or_init(|| mapping_start(brk - 1));
    }
}

/// Where the mapping of the main thread's stack started when first read, by
/// [`learn_stack_mapping`] or [`release_stack_below`] (None: not found).
static STACK_LOW: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();

/// The start of the mapping that holds `addr`, from /proc/self/maps. Read through a
/// buffer on the stack, not into a String: the heap pages such a read writes would stay
/// private pages of each lasting connection, the very memory the caller gives back.
fn mapping_start(addr: usize) -> Option<usize> {
    use std::io::Read;
    let mut maps = std::fs::File::open("/proc/self/maps").ok()?;
    let mut buf = [0u8; 1024];
    // The head of the current line: its range is all that is looked at.
    let mut head = [0u8; 48];
    let mut len = 0;
    loop {
        let n = match maps.read(&mut buf) {
            Ok(0) => return None,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return None,
        };
        for &b in &buf[..n] {
            if b != b'\n' {
                if len < head.len() {
                    head[len] = b;
                    len += 1;
                }
                continue;
            }
            if let Some((lo, hi)) = maps_range(&head[..len]) {
                if lo <= addr && addr < hi {
                    return Some(lo);
                }
            }
            len = 0;
        }
    }
}

/// The address range a line of /proc/PID/maps begins with ("lo-hi ...").
fn maps_range(line: &[u8]) -> Option<(usize, usize)> {
    let line = std::str::from_utf8(line).ok()?;
    let (range, _) = line.split_once(' ')?;
    let (lo, hi) = range.split_once('-')?;
    let lo = usize::from_str_radix(lo, 16).ok()?;
    let hi = usize::from_str_radix(hi, 16).ok()?;
    Some((lo, hi))
}

/// Learns where the main thread's stack mapping starts, for [`release_stack_below`],
/// now rather than when a connection has lasted: a supervisor calls it once before it
/// forks, and its connection processes never read /proc/self/maps themselves.
#[inline(never)]
pub fn learn_stack_mapping() {
    let marker = [0u8; 1];
    let here = std::hint::black_box(marker.as_ptr()) as usize;
    if on_main_stack(here) {
        let _ = STACK_LOW.get_or_init(|| mapping_start(here));
    }
}

/// What [`release_stack_below`] keeps below its own frame's marker.
const STACK_ROOM: usize = 512;

/// An address in the main thread's first frames (see [`mark_stack_top`]); 0 until said.
static STACK_TOP: AtomicUsize = AtomicUsize::new(0);

/// Whether `here`, an address in the caller's frame, is on the main thread's stack,
/// below where the program started: anything else (another thread, a program that never
/// said where its stack is) is left alone.
#[inline(always)]
fn on_main_stack(here: usize) -> bool {
    let top = STACK_TOP.load(Ordering::Relaxed);
    top != 0 && here < top && top - here <= 64 << 20
}

/// Says where the main thread's stack is, for [`release_stack_below`]: called first
/// thing by each program, from its outermost frame.
#[inline(never)]
pub fn mark_stack_top() {
    let marker = [0u8; 1];
    let here = std::hint::black_box(marker.as_ptr()) as usize;
    let _ = STACK_TOP.compare_exchange(0, here, Ordering::Relaxed, Ordering::Relaxed);
}

/// Gives the kernel back the pages of this thread's stack below the caller's frame (but
/// for a little room, [`STACK_ROOM`]). A connection that lasts then keeps only what its frames
/// hold, not what the deeper calls of its set-up wrote: under tcpsplice-listen a SOCKS5
/// connection's relay waits 15 KiB down the stack, and the handshake and the dial's
/// check of this host's addresses had written two pages more below it, private memory
/// of each idle connection (/proc/PID/pagemap, 2026-12-01). A page touched again comes
/// back zeroed. The range stops at the start of the stack's mapping (read from
/// /proc/self/maps once, by the supervisor before it forks or else here), so no other
/// mapping is touched whatever the kernel's gap below the stack.
#[inline(never)]
pub fn release_stack_below() {
    // A local whose address escapes lives in this frame.
    let marker = [0u8; 1];
    let here = std::hint::black_box(marker.as_ptr()) as usize;
    if !on_main_stack(here) {
        return;
    }
    let page = 4096;
    // Room for the madvise call's own return address and whatever this frame has below
    // the marker: the page under it, or part of it, is kept only when that room needs it.
    let end = here.saturating_sub(STACK_ROOM) & !(page - 1);
    let Some(low) = *STACK_LOW.get_or_init(|| mapping_start(here)) else {
        return;
    };
    let start = end.saturating_sub(STACK_RELEASE).max(low);
    if end <= start {
        return;
    }
    // SAFETY: [start, end) lies within the mapping of this thread's stack (from its
    // start, as it was when first read: the stack only grows down from there) and below
    // this function's frame, with STACK_ROOM to spare for the call below (a return
    // address; the libc wrapper has no frame): no frame lives there, and nothing points
    // into it (the stack below the lowest frame is dead by definition). MADV_DONTNEED on
    // private anonymous memory only drops pages, which come back zeroed.
    let _ = unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
}

/// Asks for a pipe of `size` bytes and returns the size the kernel granted. The request
/// may be refused (over pipe-max-size, or over the user's pipe budget); then the pipe keeps
/// its current size, which is what this returns.
pub fn pipe_resize(fd: RawFd, size: usize) -> usize {
    let want = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
    if let Ok(b) = borrow(&fd) {
        let _ = fcntl(b, FcntlArg::F_SETPIPE_SZ(want));
    }
    pipe_size(fd)
}

/// The current size of a pipe (0 if `fd` is not a pipe).
pub fn pipe_size(fd: RawFd) -> usize {
    let got = borrow(&fd).map(|b| fcntl(b, FcntlArg::F_GETPIPE_SZ));
    got.ok()
        .and_then(Result::ok)
        .and_then(|n| usize::try_from(n).ok())
        .unwrap_or(0)
}

/// splice(2) with SPLICE_F_NONBLOCK: moves up to `len` bytes between `from` and `to`, one
/// of which must be a pipe. Ok(0) is end of file on `from`.
pub fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // No offsets: use and advance the file positions.
    let flags = SpliceFFlags::SPLICE_F_NONBLOCK;
    Ok(nix::fcntl::splice(
        borrow(&from)?,
        None,
        borrow(&to)?,
        None,
        len,
        flags,
    )?)
}

/// read(2) into `buf`.
pub fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    Ok(nix::unistd::read(borrow(&fd)?, buf)?)
}

/// write(2) from `buf`.
pub fn write(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    Ok(nix::unistd::write(borrow(&fd)?, buf)?)
}

/// Writes all of `buf`, retrying on EINTR and short writes; for small blocking writes
/// such as a protocol reply.
pub fn write_all(fd: RawFd, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        let n = retry(|| write(fd, buf))?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        buf = &buf[n..];
    }
    Ok(())
}

/// shutdown(2).
pub fn shutdown(fd: RawFd, how: libc::c_int) -> io::Result<()> {
    use nix::sys::socket::Shutdown;
    let how = match how {
        libc::SHUT_RD => Shutdown::Read,
        libc::SHUT_WR => Shutdown::Write,
        libc::SHUT_RDWR => Shutdown::Both,
        _ => return Err(io::Error::from_raw_os_error(libc::EINVAL)),
    };
    Ok(nix::sys::socket::shutdown(fd, how)?)
}

/// Sets an integer socket option. By hand: nix names each option by a type of its own
/// (`sockopt::TcpNoDelay`, ...), and has no call for a (level, name) pair given as the
/// numbers the callers pass.
pub fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: we pass a pointer to an int we own and its exact size.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// Reads an integer socket option (by hand, as [`setsockopt_int`]).
pub fn getsockopt_int(fd: RawFd, level: libc::c_int, name: libc::c_int) -> io::Result<i32> {
    let mut value: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: we pass a pointer to an int we own and its size.
    cvt(unsafe {
        libc::getsockopt(
            fd,
            level,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    })?;
    Ok(value)
}

/// The pending error of a socket (SO_ERROR), cleared by reading it.
pub fn socket_error(fd: RawFd) -> Option<io::Error> {
    let pending =
        borrow(&fd).and_then(|b| Ok(nix::sys::socket::getsockopt(&b, sockopt::SocketError)?));
    match pending {
        Ok(0) => None,
        Ok(e) => Some(io::Error::from_raw_os_error(e)),
        Err(e) => Some(e),
    }
}

/// Whether `fd` is a TCP/IP socket (AF_INET or AF_INET6): such a descriptor may carry a
/// client's data, so no diagnostic may ever be written to it.
pub fn is_inet_socket(fd: RawFd) -> bool {
    matches!(
        getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_DOMAIN),
        Ok(libc::AF_INET) | Ok(libc::AF_INET6)
    )
}

/// Aborts the TCP connection of `fd` with a reset, even while other descriptors (a
/// supervisor's, or our own fd 0/1 pair) still refer to the socket: connect(AF_UNSPEC)
/// disconnects the socket itself, which sends RST on an established connection, where
/// SO_LINGER 0 + close() would only act when the last descriptor goes.
pub fn reset_connection(fd: RawFd) -> io::Result<()> {
    let _ = setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_LINGER, 0);
    // By hand: nix's addresses have no AF_UNSPEC.
    let sa = libc::sockaddr {
        sa_family: libc::AF_UNSPEC as libc::sa_family_t,
        sa_data: [0; 14],
    };
    // SAFETY: we pass a pointer to a sockaddr we own and its size.
    cvt(unsafe { libc::connect(fd, &sa, size_of::<libc::sockaddr>() as libc::socklen_t) }).map(drop)
}

/// An IP socket address of nix's as a `SocketAddr` (None for other families).
fn sockaddr_to_ip(sa: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = sa.as_sockaddr_in() {
        return Some(SocketAddr::from(*v4));
    }
    sa.as_sockaddr_in6().map(|v6| SocketAddr::from(*v6))
}

/// Converts a filled `sockaddr_storage` into a `SocketAddr` (None for non-IP families).
pub fn sockaddr_to_std(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    let len = size_of::<libc::sockaddr_storage>();
    // SAFETY: `ss` is a whole sockaddr_storage, `len` bytes we may read.
    unsafe { sockaddr_from_raw((ss as *const libc::sockaddr_storage).cast(), len) }
}

/// Calls `f` with `addr` as nix's sockaddr_in or sockaddr_in6, whose length is that of
/// the struct (a SockaddrStorage would tell the kernel 128 bytes).
fn with_sockaddr<R>(addr: &SocketAddr, f: impl FnOnce(&dyn SockaddrLike) -> R) -> R {
    match addr {
        SocketAddr::V4(a) => f(&SockaddrIn::from(*a)),
        SocketAddr::V6(a) => f(&SockaddrIn6::from(*a)),
    }
}

/// Converts a `SocketAddr` into a `sockaddr_storage` and its length, for bind/connect.
pub fn std_to_sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    with_sockaddr(addr, |sa| {
        // SAFETY: all-zero is a valid sockaddr_storage.
        let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        // SAFETY: `sa` is a sockaddr_in or sockaddr_in6 of sa.len() bytes, which fit in
        // `ss`; the two do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                sa.as_ptr().cast::<u8>(),
                (&mut ss as *mut libc::sockaddr_storage).cast::<u8>(),
                sa.len() as usize,
            )
        };
        (ss, sa.len())
    })
}

/// Reads a sockaddr the C library handed us (getaddrinfo, getifaddrs) as a SocketAddr;
/// None for other families or a length that does not fit.
///
/// # Safety
/// `addr` must be null or point to at least `len` readable bytes of a sockaddr.
pub unsafe fn sockaddr_from_raw(addr: *const libc::sockaddr, len: usize) -> Option<SocketAddr> {
    let len = libc::socklen_t::try_from(len).ok()?;
    // SAFETY: the caller promises `len` readable bytes; nix refuses null and a length
    // over a sockaddr_storage, and copies the bytes into one.
    let sa = unsafe { SockaddrStorage::from_raw(addr, Some(len)) }?;
    sockaddr_to_ip(&sa)
}

/// How a getaddrinfo(3) failed: its EAI_ code, which tells a lookup that may work later
/// (EAI_AGAIN) from a name that does not exist, and the text to show for it.
#[derive(Debug)]
pub struct LookupError {
    pub code: libc::c_int,
    pub text: String,
}

/// The first IP address getaddrinfo(3) gives for `host` as a stream socket's, of any
/// family; Ok(None) when none of them is IP. By hand: nix has no getaddrinfo, and std's
/// `ToSocketAddrs` hides the EAI_ code.
pub fn lookup_first(host: &CStr) -> Result<Option<SocketAddr>, LookupError> {
    let hints = libc::addrinfo {
        ai_flags: 0,
        ai_family: libc::AF_UNSPEC,
        ai_socktype: libc::SOCK_STREAM,
        ai_protocol: 0,
        ai_addrlen: 0,
        ai_addr: std::ptr::null_mut(),
        ai_canonname: std::ptr::null_mut(),
        ai_next: std::ptr::null_mut(),
    };
    let mut res: *mut libc::addrinfo = std::ptr::null_mut();
    // SAFETY: `host` is NUL-terminated, `hints` lives across the call, and `res` receives
    // a list we free below with freeaddrinfo.
    let rc = unsafe { libc::getaddrinfo(host.as_ptr(), std::ptr::null(), &hints, &mut res) };
    if rc != 0 {
        let text = if rc == libc::EAI_SYSTEM {
            strerror(&io::Error::last_os_error())
        } else {
            // SAFETY: gai_strerror returns a static NUL-terminated string.
            unsafe { CStr::from_ptr(libc::gai_strerror(rc)) }
                .to_string_lossy()
                .into_owned()
        };
        return Err(LookupError { code: rc, text });
    }
    let mut found = None;
    let mut cur = res;
    while !cur.is_null() && found.is_none() {
        // SAFETY: `cur` is a non-null node of the list getaddrinfo returned.
        let ai = unsafe { &*cur };
        // SAFETY: ai_addr points to ai_addrlen bytes of a sockaddr (or is null).
        found = unsafe { sockaddr_from_raw(ai.ai_addr, ai.ai_addrlen as usize) };
        cur = ai.ai_next;
    }
    // SAFETY: `res` came from a successful getaddrinfo and is freed once.
    unsafe { libc::freeaddrinfo(res) };
    Ok(found)
}

/// A new TCP socket of `addr`'s family, non-blocking and close-on-exec.
pub fn tcp_socket(addr: &SocketAddr) -> io::Result<std::os::unix::io::OwnedFd> {
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let flags = SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC;
    Ok(nix::sys::socket::socket(
        family,
        SockType::Stream,
        flags,
        None,
    )?)
}

/// bind(2) to `addr`.
pub fn bind(fd: RawFd, addr: &SocketAddr) -> io::Result<()> {
    Ok(with_sockaddr(addr, |sa| nix::sys::socket::bind(fd, sa))?)
}

/// listen(2) with a queue of `backlog`. By hand: nix's `Backlog` refuses a value over
/// SOMAXCONN (4096), where the kernel takes any and caps it at net.core.somaxconn, which
/// may be set higher (tcpsplice-listen -b takes up to 65535).
pub fn listen(fd: RawFd, backlog: libc::c_int) -> io::Result<()> {
    // SAFETY: listen takes integers only.
    cvt(unsafe { libc::listen(fd, backlog) }).map(drop)
}

/// accept4(2) with close-on-exec: the new socket, blocking (Linux does not pass
/// O_NONBLOCK on from the listener), and the client's address (None when not IP). By
/// hand: nix's accept4 drops the address, and a getpeername after it would be a second
/// call for every connection.
pub fn accept_cloexec(fd: RawFd) -> io::Result<(RawFd, Option<SocketAddr>)> {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: accept4 writes at most `len` bytes into the storage we own.
    let s = cvt(unsafe {
        libc::accept4(
            fd,
            (&mut ss as *mut libc::sockaddr_storage).cast(),
            &mut len,
            libc::SOCK_CLOEXEC,
        )
    })?;
    Ok((s, sockaddr_to_std(&ss)))
}

/// connect(2) to `addr`; on a non-blocking socket EINPROGRESS comes back as an error.
pub fn connect(fd: RawFd, addr: &SocketAddr) -> io::Result<()> {
    Ok(with_sockaddr(addr, |sa| nix::sys::socket::connect(fd, sa))?)
}

/// recv(2) into `buf` with `flags` (MSG_PEEK, MSG_DONTWAIT, ...). Ok(0) is end of file.
pub fn recv(fd: RawFd, buf: &mut [u8], flags: libc::c_int) -> io::Result<usize> {
    let flags = MsgFlags::from_bits_retain(flags);
    Ok(nix::sys::socket::recv(fd, buf, flags)?)
}

/// send(2) of `buf` with `flags`.
pub fn send(fd: RawFd, buf: &[u8], flags: libc::c_int) -> io::Result<usize> {
    let flags = MsgFlags::from_bits_retain(flags);
    Ok(nix::sys::socket::send(fd, buf, flags)?)
}

/// A netlink socket to the kernel's routing subsystem (NETLINK_ROUTE), close-on-exec.
pub fn netlink_route_socket() -> io::Result<std::os::unix::io::OwnedFd> {
    Ok(nix::sys::socket::socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        nix::sys::socket::SockProtocol::NetlinkRoute,
    )?)
}

/// The local address of a socket (None when it is not an IP socket).
pub fn local_addr(fd: RawFd) -> io::Result<Option<SocketAddr>> {
    let sa: SockaddrStorage = nix::sys::socket::getsockname(fd)?;
    Ok(sockaddr_to_ip(&sa))
}

/// The remote address of a socket (None when it is not an IP socket).
pub fn peer_addr(fd: RawFd) -> io::Result<Option<SocketAddr>> {
    let sa: SockaddrStorage = nix::sys::socket::getpeername(fd)?;
    Ok(sockaddr_to_ip(&sa))
}

/// The IP addresses of this host's interfaces, from getifaddrs(3).
pub fn interface_addresses() -> io::Result<Vec<IpAddr>> {
    let list = nix::ifaddrs::getifaddrs()?;
    let ips = list.filter_map(|ifa| ifa.address.as_ref().and_then(sockaddr_to_ip));
    Ok(ips.map(|a| a.ip()).collect())
}

/// The dispositions this process set with [`signal_ignore`], per signal number: 0 not
/// known (inherited), 1 default, 2 ignored. A connection process runs the links of the
/// chain one after another, each of which sets SIGPIPE as it starts: what is already so
/// costs no syscall. Nothing else in the suite changes a disposition.
static DISPOSITIONS: [AtomicU8; 65] = [const { AtomicU8::new(0) }; 65];

/// Sets the disposition of `sig` to ignore (`true`) or default (`false`). The programs
/// ignore SIGPIPE while they work and restore the default before exec, as ucspi-tcp does.
pub fn signal_ignore(sig: libc::c_int, ignore: bool) {
    let Ok(signal) = Signal::try_from(sig) else {
        return;
    };
    let (handler, state) = if ignore {
        (SigHandler::SigIgn, 2)
    } else {
        (SigHandler::SigDfl, 1)
    };
    let known = usize::try_from(sig).ok().and_then(|i| DISPOSITIONS.get(i));
    if known.is_some_and(|k| k.load(Ordering::Relaxed) == state) {
        return;
    }
    // SAFETY: SIG_IGN and SIG_DFL are valid dispositions; no Rust handler is installed.
    if unsafe { nix::sys::signal::signal(signal, handler) }.is_ok() {
        if let Some(k) = known {
            k.store(state, Ordering::Relaxed);
        }
    }
}

/// Calls `f` with every open descriptor of this process, by reading /proc/self/fd with
/// getdents64 into a stack buffer: after a fork every page the child writes costs a
/// copy-on-write fault, so this path allocates nothing (nix's `Dir` is opendir(3), whose
/// buffer is 32 KiB of heap, and nix has no getdents64). `f` may close the descriptor it
/// is given: /proc lists descriptors by number, so the listing goes on undisturbed.
fn for_each_open_fd(mut f: impl FnMut(RawFd)) {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    let Ok(dir) = nix::fcntl::open(c"/proc/self/fd", flags, nix::sys::stat::Mode::empty()) else {
        return;
    };
    let dir = dir.into_raw_fd();
    let mut buf = [0u8; 2048];
    loop {
        // SAFETY: the kernel writes at most buf.len() bytes of dirent64 records.
        let n = unsafe { libc::syscall(libc::SYS_getdents64, dir, buf.as_mut_ptr(), buf.len()) };
        if n <= 0 {
            break;
        }
        let mut off = 0usize;
        while off + 19 < n as usize {
            // linux_dirent64: u64 ino, i64 off, u16 reclen, u8 type, then the name.
            let reclen = u16::from_ne_bytes([buf[off + 16], buf[off + 17]]) as usize;
            if reclen == 0 {
                break;
            }
            let name = &buf[off + 19..(off + reclen).min(n as usize)];
            let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
            let fd = std::str::from_utf8(&name[..end])
                .ok()
                .and_then(|t| t.parse::<RawFd>().ok());
            if let Some(fd) = fd.filter(|&fd| fd != dir) {
                f(fd);
            }
            off += reclen;
        }
    }
    close(dir);
}

fn is_cloexec(fd: RawFd) -> bool {
    fd_flags(fd).is_ok_and(|f| f.contains(FdFlag::FD_CLOEXEC))
}

/// Closes every descriptor marked close-on-exec, as an exec would, except those in `keep`.
pub fn close_cloexec_fds(keep: &[RawFd]) {
    for_each_open_fd(|fd| {
        if !keep.contains(&fd) && is_cloexec(fd) {
            close(fd);
        }
    });
}

/// Closes every descriptor from `min` up, except those in `keep`: one close_range(2) per
/// gap between kept descriptors (Linux 5.9), or a scan of /proc/self/fd without it.
pub fn close_fds_from(min: RawFd, keep: &[RawFd]) {
    let mut kept: Vec<RawFd> = keep.iter().copied().filter(|&fd| fd >= min).collect();
    kept.sort_unstable();
    let mut from = min;
    for upto in kept.iter().map(|&k| k - 1).chain([RawFd::MAX]) {
        if from <= upto {
            touch_range(from, upto);
            // SAFETY: close_range takes integers; no descriptor we close is owned by a
            // Rust object (callers keep what they own).
            let rc =
                unsafe { libc::syscall(libc::SYS_close_range, from as u32, upto as u32, 0u32) };
            if rc != 0 {
                for_each_open_fd(|fd| {
                    if fd >= min && !keep.contains(&fd) {
                        close(fd);
                    }
                });
                return;
            }
        }
        from = upto.saturating_add(2);
    }
}

/// The descriptors from `min` up that an exec would pass on (close-on-exec clear).
pub fn inherited_fds(min: RawFd) -> Vec<RawFd> {
    let mut found = Vec::new();
    for_each_open_fd(|fd| {
        if fd >= min && !is_cloexec(fd) {
            found.push(fd);
        }
    });
    found
}

/// A copy of `fd` at the lowest free number from `min` up, close-on-exec; `fd` is closed.
pub fn fd_move_up(fd: RawFd, min: RawFd) -> io::Result<RawFd> {
    let new = fcntl(borrow(&fd)?, FcntlArg::F_DUPFD_CLOEXEC(min))?;
    close(fd);
    Ok(new)
}

/// A connected pair of AF_UNIX SOCK_SEQPACKET sockets, both close-on-exec: messages keep
/// their bounds, and a peer that is gone shows as end of file or EPIPE.
pub fn seqpacket_pair() -> io::Result<(RawFd, RawFd)> {
    let (a, b) = nix::sys::socket::socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    Ok((a.into_raw_fd(), b.into_raw_fd()))
}

/// Sends `data` with a copy of descriptor `fd` attached (SCM_RIGHTS) on the unix socket
/// `sock`, without waiting: a peer that does not take it at once is not served.
pub fn send_fd(sock: RawFd, fd: RawFd, data: &[u8]) -> io::Result<()> {
    let iov = [IoSlice::new(data)];
    let fds = [fd];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
    retry(|| {
        Ok(nix::sys::socket::sendmsg::<()>(
            sock, &iov, &cmsg, flags, None,
        )?)
    })
    .map(drop)
}

/// Waits for a message on the unix socket `sock` that carries a descriptor, as
/// [`send_fd`] sends; returns the descriptor (close-on-exec) and the length of the data
/// put in `buf`, or None at end of file.
pub fn recv_fd(sock: RawFd, buf: &mut [u8]) -> io::Result<Option<(RawFd, usize)>> {
    // Room for up to 4 descriptors; any beyond the first are closed.
    let mut control = nix::cmsg_space!([RawFd; 4]);
    let (n, fds) = retry(|| {
        let mut iov = [IoSliceMut::new(buf)];
        let msg = nix::sys::socket::recvmsg::<()>(
            sock,
            &mut iov,
            Some(&mut control),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        let mut fds = Vec::new();
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(got) = c {
                fds.extend(got);
            }
        }
        Ok((msg.bytes, fds))
    })?;
    let mut fds = fds.into_iter();
    let got = fds.next();
    fds.for_each(close);
    match got {
        Some(fd) => Ok(Some((fd, n))),
        None if n == 0 => Ok(None),
        None => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "a message without a descriptor",
        )),
    }
}

/// Sets the name ps and top show for this process (at most 15 bytes are kept). The
/// name last set is remembered, and setting it again costs no syscall: nothing else in
/// the suite names the process (a program that writes /proc/self/comm would defeat it).
pub fn set_process_name(name: &str) {
    static LAST: Mutex<([u8; 16], usize)> = Mutex::new(([0; 16], usize::MAX));
    let bytes = name.as_bytes();
    let kept = &bytes[..bytes.len().min(15)];
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    if last.1 == kept.len() && &last.0[..kept.len()] == kept {
        return;
    }
    let mut c = [0u8; 16];
    c[..kept.len()].copy_from_slice(kept);
    let Ok(cname) = CStr::from_bytes_until_nul(&c) else {
        return;
    };
    if nix::sys::prctl::set_name(cname).is_ok() {
        *last = (c, kept.len());
    }
}

/// Whether the signal mask is known to be empty: set by [`unblock_all_signals`], cleared
/// by whatever blocks a signal ([`SignalFd::new`]). Each link of an in-process chain
/// empties the mask for the next; once it is empty that costs nothing. Only the
/// single-threaded paths of the chain block signals, so one flag stands for the thread.
static MASK_EMPTY: AtomicBool = AtomicBool::new(false);

/// Whether the signals of the kept signalfd ([`SignalFd::kept`]) are blocked: set when
/// it blocks them, cleared when the mask is emptied.
static KEPT_BLOCKED: AtomicBool = AtomicBool::new(false);

/// Empties the signal mask of the calling thread.
pub fn unblock_all_signals() {
    if MASK_EMPTY.load(Ordering::Relaxed) {
        return;
    }
    if SigSet::empty().thread_set_mask().is_ok() {
        MASK_EMPTY.store(true, Ordering::Relaxed);
        KEPT_BLOCKED.store(false, Ordering::Relaxed);
    }
}

/// The text of errno `e`, for messages: strerror without the "(os error N)" suffix
/// that io::Error's Display adds. (std's text is the C library's, from strerror_r; nix's
/// `Errno::desc` is not: "Try again" for EAGAIN where strerror says "Resource
/// temporarily unavailable".)
pub fn strerror(e: &io::Error) -> String {
    let text = e.to_string();
    match e.raw_os_error() {
        Some(code) => match text.strip_suffix(&format!(" (os error {code})")) {
            Some(s) => s.to_string(),
            None => text,
        },
        None => text,
    }
}

/// A signalfd that reports `signals`, which are blocked so that they arrive only through
/// it. The relay polls it beside the data descriptors instead of running a handler.
pub struct SignalFd {
    // Closed by number in `drop`, as every descriptor here: the OwnedFd inside would add
    // an fcntl to check it first in debug builds, and abort if it was closed already.
    inner: std::mem::ManuallyDrop<nix::sys::signalfd::SignalFd>,
}

fn signal_set(signals: &[libc::c_int]) -> SigSet {
    let mut set = SigSet::empty();
    // An invalid signal number is left out, as sigaddset would refuse it.
    for s in signals.iter().filter_map(|&s| Signal::try_from(s).ok()) {
        set.add(s);
    }
    set
}

impl SignalFd {
    pub fn new(signals: &[libc::c_int]) -> io::Result<SignalFd> {
        let set = signal_set(signals);
        MASK_EMPTY.store(false, Ordering::Relaxed);
        set.thread_block()?;
        use nix::sys::signalfd::SfdFlags;
        let flags = SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC;
        let inner = nix::sys::signalfd::SignalFd::with_flags(&set, flags)?;
        Ok(SignalFd {
            inner: std::mem::ManuallyDrop::new(inner),
        })
    }

    /// The process's one signalfd for `signals` (those of the first call), made at the
    /// first call at `min` or above and kept open for the process's life: a process
    /// that relays one connection after another would otherwise make and close one per
    /// connection. The signals are blocked again when the mask was emptied since
    /// ([`unblock_all_signals`]); what arrived while they were not blocked was delivered
    /// then, not queued here.
    pub fn kept(signals: &[libc::c_int], min: RawFd) -> io::Result<&'static SignalFd> {
        static KEPT: std::sync::OnceLock<SignalFd> = std::sync::OnceLock::new();
        let sfd = match KEPT.get() {
            Some(s) => s,
            None => {
                let made = SignalFd::new(signals)?;
                KEPT_BLOCKED.store(true, Ordering::Relaxed);
                let moved = made.moved_up(min)?;
                KEPT.get_or_init(|| moved)
            }
        };
        if !KEPT_BLOCKED.load(Ordering::Relaxed) {
            MASK_EMPTY.store(false, Ordering::Relaxed);
            signal_set(signals).thread_block()?;
            KEPT_BLOCKED.store(true, Ordering::Relaxed);
        }
        Ok(sfd)
    }

    /// The same signalfd at the lowest free number from `min` up, close-on-exec.
    fn moved_up(self, min: RawFd) -> io::Result<SignalFd> {
        let fd = self.fd();
        // Not closed by our drop: fd_move_up closes it.
        std::mem::forget(self);
        let new = fd_move_up(fd, min).inspect_err(|_| close(fd))?;
        // SAFETY: `new` is a descriptor just made by F_DUPFD_CLOEXEC, owned by nothing
        // else, and a duplicate of a signalfd, which is what from_owned_fd asks for.
        let inner = unsafe {
            nix::sys::signalfd::SignalFd::from_owned_fd(std::os::fd::FromRawFd::from_raw_fd(new))
        };
        Ok(SignalFd {
            inner: std::mem::ManuallyDrop::new(inner),
        })
    }

    pub fn fd(&self) -> RawFd {
        std::os::unix::io::AsRawFd::as_raw_fd(&*self.inner)
    }

    /// The next pending signal, if any.
    pub fn take(&self) -> Option<libc::c_int> {
        let info = self.inner.read_signal().ok()??;
        Some(info.ssi_signo as libc::c_int)
    }
}

impl Drop for SignalFd {
    fn drop(&mut self) {
        close(self.fd());
    }
}

/// An epoll instance, for a process that waits on a listening socket it shares with
/// others: with `exclusive`, the kernel wakes one waiter per new connection instead of
/// all of them (EPOLLEXCLUSIVE), which poll(2) cannot ask for. Closed by number in
/// `drop`, as [`SignalFd`] is.
pub struct Epoll {
    fd: RawFd,
}

impl Epoll {
    /// A new close-on-exec instance, its descriptor at `min` or above.
    pub fn new(min: RawFd) -> io::Result<Epoll> {
        use nix::sys::epoll::{Epoll as NixEpoll, EpollCreateFlags};
        let ep = NixEpoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        Ok(Epoll {
            fd: fd_move_up(ep.0.into_raw_fd(), min)?,
        })
    }

    /// Watches `fd` for input (or its end), reported as `fd`.
    pub fn add(&self, fd: RawFd, exclusive: bool) -> io::Result<()> {
        use nix::sys::epoll::{EpollEvent, EpollFlags};
        let mut flags = EpollFlags::EPOLLIN;
        if exclusive {
            flags |= EpollFlags::EPOLLEXCLUSIVE;
        }
        borrow(&fd)?;
        let mut ev = EpollEvent::new(flags, fd as u64);
        // Epoll::add wants the instance as an OwnedFd; ours is a number, as everywhere here.
        #[allow(deprecated)]
        let added =
            nix::sys::epoll::epoll_ctl(self.fd, nix::sys::epoll::EpollOp::EpollCtlAdd, fd, &mut ev);
        Ok(added?)
    }

    /// Waits up to `timeout` (None: for ever) for the watched descriptors; returns those
    /// that are ready, in `ready` (at most its length), and how many. EINTR is retried.
    pub fn wait(
        &self,
        ready: &mut [RawFd],
        timeout: Option<std::time::Duration>,
    ) -> io::Result<usize> {
        use nix::sys::epoll::EpollEvent;
        let ms = timeout.map_or(-1, |d| {
            isize::try_from(d.as_micros().div_ceil(1000)).unwrap_or(isize::MAX)
        });
        let mut evs = [EpollEvent::empty(); 4];
        let n = evs.len().min(ready.len());
        #[allow(deprecated)] // as in `add`
        let got = retry(|| Ok(nix::sys::epoll::epoll_wait(self.fd, &mut evs[..n], ms)?))?;
        for (r, e) in ready.iter_mut().zip(&evs[..got]) {
            *r = e.data() as RawFd;
        }
        Ok(got)
    }

    pub fn fd(&self) -> RawFd {
        self.fd
    }
}

impl Drop for Epoll {
    fn drop(&mut self) {
        close(self.fd);
    }
}

/// A close-on-exec, non-blocking eventfd: a counter one process adds to, to wake another
/// that polls it ([`eventfd_add`], [`eventfd_take`]).
pub fn eventfd() -> io::Result<RawFd> {
    use nix::sys::eventfd::{EfdFlags, EventFd};
    let fd = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?;
    Ok(std::os::fd::OwnedFd::from(fd).into_raw_fd())
}

/// Adds 1 to the eventfd `fd`, waking whoever polls it. Never blocks: the counter is far
/// from full (it is taken at every wakeup).
pub fn eventfd_add(fd: RawFd) -> io::Result<()> {
    write(fd, &1u64.to_ne_bytes()).map(drop)
}

/// Takes the counter of the eventfd `fd` (zero when nothing was added).
pub fn eventfd_take(fd: RawFd) -> u64 {
    let mut b = [0u8; 8];
    match read(fd, &mut b) {
        Ok(8) => u64::from_ne_bytes(b),
        _ => 0,
    }
}

/// poll(2) over `fds`, retried on EINTR; `timeout` None waits for ever. An entry with a
/// negative fd is ignored and gets no events, as poll(2) does with it: nix's `PollFd`
/// cannot hold one, so it is left out of the call.
pub fn poll(fds: &mut [libc::pollfd], timeout: Option<std::time::Duration>) -> io::Result<usize> {
    let ms = match timeout {
        None => -1,
        // Round up so a deadline is never polled for 0 ms before it has passed.
        Some(d) => libc::c_int::try_from(d.as_micros().div_ceil(1000)).unwrap_or(libc::c_int::MAX),
    };
    // Not nix's poll: its PollFd wants a BorrowedFd for every entry (three vectors per
    // call on the relay's wake-up path) and its revents() drops a whole answer holding
    // a flag it does not know (POLLRDHUP), where poll(2) takes and fills the array as
    // it is. Negative descriptors are ignored by the kernel, as the callers expect.
    // SAFETY: the kernel reads and writes exactly fds.len() pollfd structs we own.
    retry(|| cvt(unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) }))
        .map(|n| n as usize)
}

/// Whether `fd` is a terminal.
pub fn isatty(fd: RawFd) -> bool {
    borrow(&fd).is_ok_and(|b| nix::unistd::isatty(b).unwrap_or(false))
}

extern "C" {
    /// The C library's environment: what exec passes on and getenv reads.
    static environ: *const *const libc::c_char;
}

/// Calls `f` with the address of each entry of the C library's environment, in order.
fn each_environ_entry(mut f: impl FnMut(usize)) {
    // SAFETY: `environ` is null or points to an array of string pointers ended by a null
    // one, which only setenv, unsetenv, putenv and clearenv change. The suite calls those
    // only from `environ`, on the main thread, and this runs on that thread: the one other
    // thread a link may start, a name lookup, only reads the environment. Only the
    // pointers are read, never the strings.
    unsafe {
        let mut p = environ;
        if p.is_null() {
            return;
        }
        while !(*p).is_null() {
            f(*p as usize);
            p = p.add(1);
        }
    }
}

/// The addresses of the entries of the C library's environment, into `out` (emptied
/// first). Any change through setenv, unsetenv or putenv changes at least one of them,
/// or their number: setenv never writes into an entry it handed out.
pub fn environ_entries(out: &mut Vec<usize>) {
    out.clear();
    each_environ_entry(|e| out.push(e));
}

/// Whether the C library's environment still has exactly the entries `entries` that
/// [`environ_entries`] gave; allocates nothing.
pub fn environ_entries_are(entries: &[usize]) -> bool {
    let (mut i, mut same) = (0, true);
    each_environ_entry(|e| {
        same &= entries.get(i) == Some(&e);
        i += 1;
    });
    same && i == entries.len()
}

/// Whether the file at `path` may be executed (access(2) with X_OK).
pub fn is_executable(path: &std::path::Path) -> bool {
    nix::unistd::access(path, nix::unistd::AccessFlags::X_OK).is_ok()
}

/// execvp(3): runs `argv[0]`, searched for in PATH, with `argv`; returns only on
/// failure, with its error.
pub fn execvp(argv: &[std::ffi::CString]) -> io::Error {
    let Some(prog) = argv.first() else {
        return io::Error::from_raw_os_error(libc::EINVAL);
    };
    match nix::unistd::execvp(prog, argv) {
        Err(e) => e.into(),
        Ok(never) => match never {},
    }
}

/// execv(3): runs the file `path` with `argv`; returns only on failure, with its error.
pub fn execv(path: &std::ffi::CStr, argv: &[std::ffi::CString]) -> io::Error {
    match nix::unistd::execv(path, argv) {
        Err(e) => e.into(),
        Ok(never) => match never {},
    }
}

/// Arranges for the child `cmd` starts to get a copy of `fd` as descriptor `at`, with
/// close-on-exec cleared (a checkpassword program reads fd 3).
pub fn pass_fd_to_child(cmd: &mut std::process::Command, fd: RawFd, at: RawFd) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the child between fork and exec, where only
    // async-signal-safe calls may be made: fd_copy is dup2, or fcntl when fd == at, on
    // descriptors that exist in the child, and allocates nothing.
    unsafe {
        cmd.pre_exec(move || fd_copy(at, fd));
    }
}

/// A descriptor that becomes readable when process `pid` (our child) exits, so that a
/// wait can have a deadline without polling (pidfd_open(2), Linux 5.3).
pub fn pidfd_open(pid: u32) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1; nix
    // has no wrapper for it.
    let fd = cvt(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) })?;
    // SAFETY: the descriptor is new and ours alone.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Sends SIGKILL to every process of process group `pgid` (a checker and whatever it
/// started); a group already gone is no error.
pub fn kill_group(pgid: u32) {
    if let Ok(p) = libc::pid_t::try_from(pgid) {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(p), nix::sys::signal::SIGKILL);
    }
}

/// The terminal settings of `fd` with echo turned off, and the settings to put back
/// (tcpsplice-auth -H asking for a password on a terminal).
pub fn tty_echo_off(fd: RawFd) -> io::Result<libc::termios> {
    // SAFETY: termios is plain data; tcgetattr fills it in.
    let mut saved: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: tcgetattr writes into the struct we own.
    cvt(unsafe { libc::tcgetattr(fd, &mut saved) })?;
    let mut quiet = saved;
    quiet.c_lflag &= !(libc::ECHO | libc::ECHOE | libc::ECHOK | libc::ECHONL);
    // SAFETY: tcsetattr reads the struct we own.
    cvt(unsafe { libc::tcsetattr(fd, libc::TCSAFLUSH, &quiet) })?;
    Ok(saved)
}

/// Puts back terminal settings that [`tty_echo_off`] returned.
pub fn tty_restore(fd: RawFd, saved: &libc::termios) -> io::Result<()> {
    // SAFETY: tcsetattr reads the struct we own.
    cvt(unsafe { libc::tcsetattr(fd, libc::TCSAFLUSH, saved) }).map(drop)
}

/// Opens /dev/null for reading and writing, close-on-exec when asked; the lowest free
/// descriptor, as open(2) always gives.
pub fn open_devnull(cloexec: bool) -> io::Result<RawFd> {
    let mut flags = OFlag::O_RDWR;
    if cloexec {
        flags |= OFlag::O_CLOEXEC;
    }
    let fd = nix::fcntl::open(c"/dev/null", flags, nix::sys::stat::Mode::empty())?;
    Ok(fd.into_raw_fd())
}

/// A pipe with both ends close-on-exec (blocking): (read, write).
pub fn pipe_cloexec() -> io::Result<(RawFd, RawFd)> {
    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    Ok((r.into_raw_fd(), w.into_raw_fd()))
}

/// Sends `sig` to process `pid`; a process already gone is no error of the caller's.
pub fn kill(pid: libc::pid_t, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
}

/// How a child ended, as waitpid reported it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChildEnd {
    Exited(i32),
    Signaled(i32),
}

/// Reaps one child that has ended, without waiting: its pid and how it ended, or None
/// when none has (or there is none, or a signal interrupted the call).
pub fn reap_child() -> Option<(libc::pid_t, ChildEnd)> {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return None,
            Ok(st) => {
                if let Some(end) = child_end(st) {
                    return Some(end);
                }
            }
        }
    }
}

/// Waits for child `pid` to end, and says how it did.
pub fn wait_child(pid: libc::pid_t) -> io::Result<ChildEnd> {
    use nix::sys::wait::waitpid;
    loop {
        match waitpid(nix::unistd::Pid::from_raw(pid), None) {
            Ok(st) => {
                if let Some((_, end)) = child_end(st) {
                    return Ok(end);
                }
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(io::Error::from(e)),
        }
    }
}

/// The end a waitpid status reports: None for a child only stopped or continued (not
/// asked for, but not an end either: wait again).
fn child_end(st: nix::sys::wait::WaitStatus) -> Option<(libc::pid_t, ChildEnd)> {
    use nix::sys::wait::WaitStatus;
    match st {
        WaitStatus::Exited(pid, code) => Some((pid.as_raw(), ChildEnd::Exited(code))),
        WaitStatus::Signaled(pid, sig, _) => Some((pid.as_raw(), ChildEnd::Signaled(sig as i32))),
        _ => None,
    }
}

/// What fork returned in this process.
pub enum Forked {
    Parent(libc::pid_t),
    Child,
}

/// fork(2), for tcpsplice-listen's supervisor, which never starts a thread: the child is
/// a whole copy of it and may run ordinary code, allocation included, until it execs or
/// exits. No other caller may use it.
pub fn fork_single_threaded() -> io::Result<Forked> {
    // SAFETY: the only caller is the single-threaded supervisor (see above), where the
    // child inherits no lock held by another thread.
    match unsafe { nix::unistd::fork() }? {
        nix::unistd::ForkResult::Parent { child } => Ok(Forked::Parent(child.as_raw())),
        nix::unistd::ForkResult::Child => Ok(Forked::Child),
    }
}

/// This process's id.
pub fn getpid() -> libc::pid_t {
    nix::unistd::getpid().as_raw()
}

pub fn getppid() -> libc::pid_t {
    nix::unistd::getppid().as_raw()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mapping_of_an_address_is_found_and_of_no_address_none() {
        let local = [1u8; 1];
        let addr = std::hint::black_box(local.as_ptr()) as usize;
        let low = mapping_start(addr).expect("the mapping of a local");
        assert!(low <= addr && addr - low < 1 << 30, "{low:#x} {addr:#x}");
        assert_eq!(low % 4096, 0);
        assert_eq!(mapping_start(0), None);
    }
}
