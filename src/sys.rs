//! The syscall layer. Every libc call of the suite that can fail goes through [`cvt`], so
//! errno becomes an `io::Error` in one place, and every `unsafe` block lives here or in
//! a module that says why it cannot.

use std::ffi::CStr;
use std::io;
use std::mem::{size_of, MaybeUninit};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::unix::io::RawFd;

/// Turns a C-style `-1 means errno` return into a `Result`.
pub fn cvt<T: Copy + PartialEq + From<i8>>(ret: T) -> io::Result<T> {
    if ret == T::from(-1) {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
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
    let mut st = MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat writes a whole `stat` into the buffer we own when it returns 0.
    cvt(unsafe { libc::fstat(fd, st.as_mut_ptr()) })?;
    // SAFETY: fstat succeeded, so the struct is initialised.
    Ok(unsafe { st.assume_init() })
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

/// Whether `fd` is open at all.
pub fn fd_is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only reads the descriptor table.
    unsafe { libc::fcntl(fd, libc::F_GETFD) != -1 }
}

/// The file status flags of `fd` (O_NONBLOCK, O_APPEND, ...).
pub fn get_fl(fd: RawFd) -> io::Result<libc::c_int> {
    // SAFETY: F_GETFL takes no pointer.
    cvt(unsafe { libc::fcntl(fd, libc::F_GETFL) })
}

/// Sets the file status flags of `fd`.
pub fn set_fl(fd: RawFd, flags: libc::c_int) -> io::Result<()> {
    // SAFETY: F_SETFL takes an int.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFL, flags) }).map(drop)
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
    // SAFETY: F_GETFD/F_SETFD take no pointer.
    let old = cvt(unsafe { libc::fcntl(fd, libc::F_GETFD) })?;
    let new = if on {
        old | libc::FD_CLOEXEC
    } else {
        old & !libc::FD_CLOEXEC
    };
    if new != old {
        // SAFETY: as above.
        cvt(unsafe { libc::fcntl(fd, libc::F_SETFD, new) })?;
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
    // SAFETY: dup2 takes two integers; the new fd has FD_CLOEXEC clear.
    retry(|| cvt(unsafe { libc::dup2(from, to) })).map(drop)
}

/// Closes `fd`, ignoring errors: there is nothing useful to do about a failed close of a
/// descriptor we are done with.
pub fn close(fd: RawFd) {
    // SAFETY: closing an integer fd has no memory-safety consequences for us; callers
    // never close a descriptor owned by a Rust object.
    unsafe { libc::close(fd) };
}

/// Creates a pipe with both ends O_NONBLOCK and O_CLOEXEC: (read end, write end).
pub fn pipe_nonblocking() -> io::Result<(RawFd, RawFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 writes two ints into the array we own.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) })?;
    Ok((fds[0], fds[1]))
}

/// Asks for a pipe of `size` bytes and returns the size the kernel granted. The request
/// may be refused (over pipe-max-size, or over the user's pipe budget); then the pipe keeps
/// its current size, which is what this returns.
pub fn pipe_resize(fd: RawFd, size: usize) -> usize {
    let want = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
    // SAFETY: F_SETPIPE_SZ takes an int.
    unsafe { libc::fcntl(fd, libc::F_SETPIPE_SZ, want) };
    pipe_size(fd)
}

/// The current size of a pipe (0 if `fd` is not a pipe).
pub fn pipe_size(fd: RawFd) -> usize {
    // SAFETY: F_GETPIPE_SZ takes no argument.
    let got = unsafe { libc::fcntl(fd, libc::F_GETPIPE_SZ) };
    usize::try_from(got).unwrap_or(0)
}

/// splice(2) with SPLICE_F_NONBLOCK: moves up to `len` bytes between `from` and `to`, one
/// of which must be a pipe. Ok(0) is end of file on `from`.
pub fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: null offsets mean "use and advance the file position"; no memory is passed.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_NONBLOCK,
        )
    };
    cvt(n).map(|n| n as usize)
}

/// read(2) into `buf`.
pub fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: the kernel writes at most buf.len() bytes into memory we own.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    cvt(n).map(|n| n as usize)
}

/// write(2) from `buf`.
pub fn write(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: the kernel reads at most buf.len() bytes from memory we own.
    let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
    cvt(n).map(|n| n as usize)
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
    // SAFETY: shutdown takes two integers.
    cvt(unsafe { libc::shutdown(fd, how) }).map(drop)
}

/// Sets an integer socket option.
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

/// Reads an integer socket option.
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
    match getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_ERROR) {
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
    // SAFETY: an all-zero sockaddr is a valid AF_UNSPEC address.
    let mut sa: libc::sockaddr = unsafe { std::mem::zeroed() };
    sa.sa_family = libc::AF_UNSPEC as libc::sa_family_t;
    // SAFETY: we pass a pointer to a sockaddr we own and its size.
    cvt(unsafe { libc::connect(fd, &sa, size_of::<libc::sockaddr>() as libc::socklen_t) }).map(drop)
}

/// Converts a filled `sockaddr_storage` into a `SocketAddr` (None for non-IP families).
pub fn sockaddr_to_std(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match ss.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in, and
            // sockaddr_storage is large and aligned enough for it.
            let sin =
                unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 =
                unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Converts a `SocketAddr` into a `sockaddr_storage` and its length, for bind/connect.
pub fn std_to_sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in.
            let sin = unsafe {
                &mut *(&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>()
            };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from(*a.ip()).to_be();
            (ss, size_of::<libc::sockaddr_in>() as libc::socklen_t)
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe {
                &mut *(&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr.s6_addr = a.ip().octets();
            sin6.sin6_flowinfo = a.flowinfo();
            sin6.sin6_scope_id = a.scope_id();
            (ss, size_of::<libc::sockaddr_in6>() as libc::socklen_t)
        }
    }
}

/// Reads a sockaddr the C library handed us (getaddrinfo, getifaddrs) as a SocketAddr;
/// None for other families or a length that does not fit.
///
/// # Safety
/// `addr` must be null or point to at least `len` readable bytes of a sockaddr.
pub unsafe fn sockaddr_from_raw(addr: *const libc::sockaddr, len: usize) -> Option<SocketAddr> {
    if addr.is_null() || len > size_of::<libc::sockaddr_storage>() {
        return None;
    }
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    // SAFETY: the caller promises `len` readable bytes; they fit in `ss` (checked).
    unsafe {
        std::ptr::copy_nonoverlapping(
            addr.cast::<u8>(),
            (&mut ss as *mut libc::sockaddr_storage).cast::<u8>(),
            len,
        )
    };
    sockaddr_to_std(&ss)
}

/// A new TCP socket of `addr`'s family, non-blocking and close-on-exec.
pub fn tcp_socket(addr: &SocketAddr) -> io::Result<std::os::unix::io::OwnedFd> {
    use std::os::unix::io::FromRawFd;
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let ty = libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
    // SAFETY: socket takes three integers.
    let fd = cvt(unsafe { libc::socket(family, ty, 0) })?;
    // SAFETY: fd is a new descriptor that nothing else owns.
    Ok(unsafe { std::os::unix::io::OwnedFd::from_raw_fd(fd) })
}

/// bind(2) to `addr`.
pub fn bind(fd: RawFd, addr: &SocketAddr) -> io::Result<()> {
    let (ss, len) = std_to_sockaddr(addr);
    // SAFETY: we pass a sockaddr we own and its length.
    cvt(unsafe { libc::bind(fd, (&ss as *const libc::sockaddr_storage).cast(), len) }).map(drop)
}

/// connect(2) to `addr`; on a non-blocking socket EINPROGRESS comes back as an error.
pub fn connect(fd: RawFd, addr: &SocketAddr) -> io::Result<()> {
    let (ss, len) = std_to_sockaddr(addr);
    // SAFETY: we pass a sockaddr we own and its length.
    cvt(unsafe { libc::connect(fd, (&ss as *const libc::sockaddr_storage).cast(), len) }).map(drop)
}

fn sock_name(
    fd: RawFd,
    f: unsafe extern "C" fn(libc::c_int, *mut libc::sockaddr, *mut libc::socklen_t) -> libc::c_int,
) -> io::Result<Option<SocketAddr>> {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: getsockname/getpeername write at most `len` bytes into storage we own.
    cvt(unsafe {
        f(
            fd,
            (&mut ss as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    })?;
    Ok(sockaddr_to_std(&ss))
}

/// The local address of a socket (None when it is not an IP socket).
pub fn local_addr(fd: RawFd) -> io::Result<Option<SocketAddr>> {
    sock_name(fd, libc::getsockname)
}

/// The remote address of a socket (None when it is not an IP socket).
pub fn peer_addr(fd: RawFd) -> io::Result<Option<SocketAddr>> {
    sock_name(fd, libc::getpeername)
}

/// Sets the disposition of `sig` to ignore (`true`) or default (`false`). The programs
/// ignore SIGPIPE while they work and restore the default before exec, as ucspi-tcp does.
pub fn signal_ignore(sig: libc::c_int, ignore: bool) {
    let handler = if ignore { libc::SIG_IGN } else { libc::SIG_DFL };
    // SAFETY: SIG_IGN and SIG_DFL are valid dispositions; no Rust handler is installed.
    unsafe { libc::signal(sig, handler) };
}

/// Calls `f` with every open descriptor of this process, by reading /proc/self/fd with
/// getdents64 into a stack buffer: after a fork every page the child writes costs a
/// copy-on-write fault, so this path allocates nothing. `f` may close the descriptor it
/// is given: /proc lists descriptors by number, so the listing goes on undisturbed.
fn for_each_open_fd(mut f: impl FnMut(RawFd)) {
    // SAFETY: a constant NUL-terminated path.
    let dir = unsafe {
        libc::open(
            c"/proc/self/fd".as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if dir < 0 {
        return;
    }
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
    // SAFETY: F_GETFD only reads the descriptor table.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    flags >= 0 && flags & libc::FD_CLOEXEC != 0
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
    // SAFETY: F_DUPFD_CLOEXEC takes an int and returns a new descriptor.
    let new = cvt(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, min) })?;
    close(fd);
    Ok(new)
}

/// A connected pair of AF_UNIX SOCK_SEQPACKET sockets, both close-on-exec: messages keep
/// their bounds, and a peer that is gone shows as end of file or EPIPE.
pub fn seqpacket_pair() -> io::Result<(RawFd, RawFd)> {
    let mut fds = [-1; 2];
    // SAFETY: socketpair writes two descriptors into the array we own.
    cvt(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    })?;
    Ok((fds[0], fds[1]))
}

/// Sends `data` with a copy of descriptor `fd` attached (SCM_RIGHTS) on the unix socket
/// `sock`, without waiting: a peer that does not take it at once is not served.
pub fn send_fd(sock: RawFd, fd: RawFd, data: &[u8]) -> io::Result<()> {
    // u64 words keep the control buffer aligned for cmsghdr.
    let mut control = [0u64; 4];
    // SAFETY: CMSG_SPACE is arithmetic.
    let space = unsafe { libc::CMSG_SPACE(size_of::<RawFd>() as u32) } as usize;
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain data; the fields we need are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space;
    // SAFETY: msg_control points at `space` <= 32 aligned bytes we own, so the first
    // header fits, and CMSG_DATA points inside it with room for one int.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<RawFd>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
    }
    // SAFETY: every pointer in msg refers to memory that lives across the call.
    retry(|| cvt(unsafe { libc::sendmsg(sock, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) }))
        .map(drop)
}

/// Waits for a message on the unix socket `sock` that carries a descriptor, as
/// [`send_fd`] sends; returns the descriptor (close-on-exec) and the length of the data
/// put in `buf`, or None at end of file.
pub fn recv_fd(sock: RawFd, buf: &mut [u8]) -> io::Result<Option<(RawFd, usize)>> {
    let mut control = [0u64; 4];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; the fields we need are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = size_of::<[u64; 4]>();
    // SAFETY: the kernel writes at most iov_len bytes into buf and msg_controllen bytes
    // into control, both ours.
    let n = retry(|| cvt(unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) }))?;
    let mut got = None;
    // SAFETY: the kernel filled msg_control with msg_controllen bytes of well-formed
    // headers; CMSG_FIRSTHDR/CMSG_NXTHDR stay inside them.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let count = ((*cmsg).cmsg_len - libc::CMSG_LEN(0) as usize) / size_of::<RawFd>();
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for i in 0..count {
                    let fd = std::ptr::read_unaligned(data.add(i));
                    if got.is_none() {
                        got = Some(fd);
                    } else {
                        close(fd);
                    }
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    match got {
        Some(fd) => Ok(Some((fd, n as usize))),
        None if n == 0 => Ok(None),
        None => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "a message without a descriptor",
        )),
    }
}

/// Sets the name ps and top show for this process (at most 15 bytes are kept).
pub fn set_process_name(name: &CStr) {
    // SAFETY: PR_SET_NAME reads a NUL-terminated string.
    unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
}

/// Empties the signal mask of the calling thread.
pub fn unblock_all_signals() {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t we own; no old-set pointer.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
}

/// The text of errno `e`, for messages: strerror without the "(os error N)" suffix
/// that io::Error's Display adds.
pub fn strerror(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => {
            // SAFETY: strerror returns a pointer to a NUL-terminated static or
            // thread-local string, which we copy at once.
            let s = unsafe { CStr::from_ptr(libc::strerror(code)) };
            s.to_string_lossy().into_owned()
        }
        None => e.to_string(),
    }
}

/// A signalfd that reports `signals`, which are blocked so that they arrive only through
/// it. The relay polls it beside the data descriptors instead of running a handler.
pub struct SignalFd {
    fd: RawFd,
}

impl SignalFd {
    pub fn new(signals: &[libc::c_int]) -> io::Result<SignalFd> {
        // SAFETY: sigset_t is plain data; sigemptyset initialises it.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t we own.
        unsafe { libc::sigemptyset(&mut set) };
        for &s in signals {
            // SAFETY: as above; an invalid signal number only makes sigaddset fail.
            unsafe { libc::sigaddset(&mut set, s) };
        }
        // SAFETY: we pass a valid set and no old-set pointer.
        cvt(unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) })?;
        // SAFETY: a valid set; -1 asks for a new descriptor.
        let fd = cvt(unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) })?;
        Ok(SignalFd { fd })
    }

    pub fn fd(&self) -> RawFd {
        self.fd
    }

    /// The next pending signal, if any.
    pub fn take(&self) -> Option<libc::c_int> {
        // SAFETY: signalfd_siginfo is plain data.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = size_of::<libc::signalfd_siginfo>();
        // SAFETY: the kernel writes at most `size` bytes into the struct we own.
        let n = unsafe {
            libc::read(
                self.fd,
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                size,
            )
        };
        (n == size as isize).then_some(info.ssi_signo as libc::c_int)
    }
}

impl Drop for SignalFd {
    fn drop(&mut self) {
        close(self.fd);
    }
}

/// poll(2) over `fds`, retried on EINTR; `timeout` None waits for ever.
pub fn poll(fds: &mut [libc::pollfd], timeout: Option<std::time::Duration>) -> io::Result<usize> {
    let ms = match timeout {
        None => -1,
        // Round up so a deadline is never polled for 0 ms before it has passed.
        Some(d) => libc::c_int::try_from(d.as_micros().div_ceil(1000)).unwrap_or(libc::c_int::MAX),
    };
    // SAFETY: the kernel reads and writes exactly fds.len() pollfd structs we own.
    retry(|| cvt(unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) }))
        .map(|n| n as usize)
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
