//! Helpers shared by the suites: running the programs, showing everything on failure,
//! generating and hashing data, loopback sockets, waiting with a bound.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A finished command, kept whole so a failed assertion can show all of it.
pub struct Ran {
    pub cmd: String,
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Ran {
    pub fn from_output(cmd: &Command, out: Output) -> Ran {
        Ran {
            cmd: format!("{cmd:?}"),
            status: out.status,
            stdout: out.stdout,
            stderr: out.stderr,
        }
    }

    pub fn show(&self) -> String {
        format!(
            "\n--- command: {}\n--- status: {:?}\n--- stdout ({} bytes): {}\n--- stderr: {}\n",
            self.cmd,
            self.status,
            self.stdout.len(),
            String::from_utf8_lossy(&self.stdout[..self.stdout.len().min(2000)]),
            String::from_utf8_lossy(&self.stderr),
        )
    }

    /// Panics with the whole story unless the exit code is `code`.
    pub fn expect_code(&self, code: i32) -> &Ran {
        assert_eq!(
            self.status.code(),
            Some(code),
            "unexpected exit status{}",
            self.show()
        );
        self
    }

    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// Runs `cmd` to completion with a bound on its run time.
pub fn run(cmd: &mut Command, limit: Duration) -> Ran {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn {cmd:?}: {e}"));
    let desc = format!("{cmd:?}");
    finish(child, &desc, limit)
}

/// Waits for a spawned child (stdout/stderr piped) with a bound, killing it on timeout.
pub fn finish(mut child: Child, desc: &str, limit: Duration) -> Ran {
    let mut so = child.stdout.take();
    let mut se = child.stderr.take();
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        if let Some(s) = so.as_mut() {
            let _ = s.read_to_end(&mut v);
        }
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        if let Some(s) = se.as_mut() {
            let _ = s.read_to_end(&mut v);
        }
        v
    });
    let status = match wait_timeout(&mut child, limit) {
        Some(s) => s,
        None => {
            let _ = child.kill();
            let s = child.wait().expect("wait after kill");
            let ran = Ran {
                cmd: desc.to_string(),
                status: s,
                stdout: t_out.join().unwrap_or_default(),
                stderr: t_err.join().unwrap_or_default(),
            };
            panic!("command did not finish within {limit:?}{}", ran.show());
        }
    };
    Ran {
        cmd: desc.to_string(),
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    }
}

/// Polls a child until it exits or `limit` passes.
pub fn wait_timeout(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let end = Instant::now() + limit;
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        if Instant::now() >= end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Deterministic pseudo-random bytes: test data that no accident reproduces.
pub struct Pattern {
    state: u64,
}

impl Pattern {
    pub fn new(seed: u64) -> Pattern {
        Pattern {
            state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
        }
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            // xorshift64*
            self.state ^= self.state >> 12;
            self.state ^= self.state << 25;
            self.state ^= self.state >> 27;
            let v = self.state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    Pattern::new(seed).fill(&mut v);
    v
}

/// A streaming 64-bit hash (FNV-1a over 8-byte words, then the tail): cheap enough for
/// hundreds of MiB in a debug build, and any lost, doubled or reordered chunk changes it.
#[derive(Clone)]
pub struct Hash {
    h: u64,
    tail: Vec<u8>,
    pub len: u64,
}

impl Default for Hash {
    fn default() -> Self {
        Hash {
            h: 0xcbf2_9ce4_8422_2325,
            tail: Vec::new(),
            len: 0,
        }
    }
}

impl Hash {
    pub fn update(&mut self, mut data: &[u8]) {
        self.len += data.len() as u64;
        if !self.tail.is_empty() {
            let need = 8 - self.tail.len();
            let take = need.min(data.len());
            self.tail.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.tail.len() == 8 {
                let w = u64::from_le_bytes(self.tail[..].try_into().unwrap());
                self.word(w);
                self.tail.clear();
            }
        }
        let mut chunks = data.chunks_exact(8);
        for c in &mut chunks {
            self.word(u64::from_le_bytes(c.try_into().unwrap()));
        }
        self.tail.extend_from_slice(chunks.remainder());
    }

    fn word(&mut self, w: u64) {
        self.h ^= w;
        self.h = self.h.wrapping_mul(0x0000_0100_0000_01B3).rotate_left(29);
    }

    pub fn finish(&self) -> (u64, u64) {
        let mut h = self.h;
        for &b in &self.tail {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01B3);
        }
        (h, self.len)
    }
}

pub fn hash_of(data: &[u8]) -> (u64, u64) {
    let mut h = Hash::default();
    h.update(data);
    h.finish()
}

/// Sends `len` pattern bytes from `seed` and returns their hash.
pub fn send_pattern(w: &mut impl Write, seed: u64, len: u64) -> std::io::Result<(u64, u64)> {
    let mut p = Pattern::new(seed);
    let mut h = Hash::default();
    let mut buf = vec![0u8; 256 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        p.fill(&mut buf[..n]);
        h.update(&buf[..n]);
        w.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(h.finish())
}

/// Reads to end of file and returns the hash of everything read.
pub fn recv_hash(r: &mut impl Read) -> std::io::Result<(u64, u64)> {
    let mut h = Hash::default();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok(h.finish());
        }
        h.update(&buf[..n]);
    }
}

/// A listener on an ephemeral loopback port.
pub fn listener() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let a = l.local_addr().expect("local_addr");
    (l, a)
}

/// A connected loopback pair: (the end the test keeps, the end it hands to a program).
pub fn tcp_pair() -> (TcpStream, TcpStream) {
    let (l, a) = listener();
    let c = TcpStream::connect(a).expect("connect loopback");
    let (s, _) = l.accept().expect("accept loopback");
    (c, s)
}

/// Accepts one connection with a bound on the wait.
pub fn accept_timeout(l: &TcpListener, limit: Duration) -> TcpStream {
    l.set_nonblocking(true).expect("nonblocking listener");
    let end = Instant::now() + limit;
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).expect("blocking stream");
                return s;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < end, "no connection within {limit:?}");
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

pub fn half_close(s: &TcpStream) {
    s.shutdown(Shutdown::Write).expect("shutdown(SHUT_WR)");
}

/// Whether we run as root (some tests need another uid or to read a sysctl).
pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Sets the soft RLIMIT_NOFILE of `pid`, keeping its hard limit (raising a hard limit
/// needs CAP_SYS_RESOURCE, which a container may lack even for root).
pub fn set_nofile(pid: i32, n: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit writes the old limits into the struct we own.
    let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut lim) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    lim.rlim_cur = n.min(lim.rlim_max);
    // SAFETY: prlimit reads the struct we own and writes no old value.
    let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &lim, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

/// A TCP connection to 127.0.0.1:`port` from the loopback address `src`.
pub fn connect_from(src: &str, port: u16) -> TcpStream {
    use std::os::fd::FromRawFd;
    let src: std::net::Ipv4Addr = src.parse().expect("an IPv4 source");
    // SAFETY: a new socket, owned by the TcpStream made of it below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: fd is a socket we just made and own from here on.
    let s = unsafe { TcpStream::from_raw_fd(fd) };
    let sin = |ip: std::net::Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let here = sin(src, 0);
    let there = sin(std::net::Ipv4Addr::LOCALHOST, port);
    // SAFETY: bind and connect read the sockaddr_in structs we own.
    unsafe {
        assert_eq!(
            libc::bind(fd, (&here as *const libc::sockaddr_in).cast(), len),
            0
        );
        assert_eq!(
            libc::connect(fd, (&there as *const libc::sockaddr_in).cast(), len),
            0,
            "connect: {}",
            std::io::Error::last_os_error()
        );
    }
    s
}

/// The credentials of an HTTP `Proxy-Authorization: Basic` header.
pub fn basic(user: &str, pw: &str) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = format!("{user}:{pw}").into_bytes();
    let mut s = String::new();
    for c in b.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                s.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

/// Runs `cmd` with `hosts` in place of /etc/hosts, seen by it alone: the child makes a
/// mount namespace of its own and bind-mounts the file there (needs root), so the
/// machine's /etc/hosts is never touched.
pub fn with_hosts_file(cmd: &mut Command, hosts: &std::path::Path) {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::process::CommandExt;
    let src = std::ffi::CString::new(hosts.as_os_str().as_bytes()).expect("hosts path");
    // SAFETY: unshare and mount are system calls, safe between fork and exec; every
    // pointer is a NUL-terminated string that the closure owns, or NULL.
    unsafe {
        cmd.pre_exec(move || {
            let none = std::ptr::null();
            let ok = libc::unshare(libc::CLONE_NEWNS) == 0
                // Private first, so that the bind mount stays in this namespace.
                && libc::mount(
                    c"none".as_ptr(),
                    c"/".as_ptr(),
                    none,
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) == 0
                && libc::mount(
                    src.as_ptr(),
                    c"/etc/hosts".as_ptr(),
                    none,
                    libc::MS_BIND,
                    std::ptr::null(),
                ) == 0;
            if ok {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
}

/// Waits until something listens on 127.0.0.1:`port`, as /proc/net/tcp shows it; asking
/// with a connection would start the service.
pub fn wait_listening(port: u16, child: &mut Child, what: &str) {
    let needle = format!("0100007F:{port:04X} 00000000:0000 0A");
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
        if table.contains(&needle) {
            return;
        }
        if let Ok(Some(s)) = child.try_wait() {
            panic!("{what} exited before listening: {s:?}");
        }
        assert!(Instant::now() < end, "{what} did not listen on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `cmd args` with `input` on its stdin; it must succeed. Its output, trimmed.
pub fn tool(cmd: &str, args: &[&str], input: &str) -> String {
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd} is needed (scripts/deps/test.txt): {e}"));
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "{cmd} {args:?} failed: {out:?}");
    String::from_utf8(out.stdout)
        .expect("utf8")
        .trim()
        .to_string()
}

/// A hash of `pw` made by `mkpasswd -m METHOD` (package whois).
pub fn mkpasswd(method: &str, pw: &str) -> String {
    tool("mkpasswd", &["-m", method, "-s"], pw)
}

/// How a SOCKS5 connection was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Socks5Error {
    /// Closed before any answer.
    Closed,
    /// The RFC 1929 login failed with this status.
    Auth(u8),
    /// The CONNECT was answered with this REP.
    Rep(u8),
}

/// A SOCKS5 CONNECT to the echo target on 127.0.0.1:`target` from `src` through
/// `port`, logging in as `login` when given; Ok(the connection, ready for data) or
/// Err(how it was refused).
pub fn socks5(
    src: &str,
    port: u16,
    login: Option<(&str, &str)>,
    target: u16,
) -> Result<TcpStream, Socks5Error> {
    let mut s = connect_from(src, port);
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let method = if login.is_some() { 2 } else { 0 };
    s.write_all(&[5, 1, method]).expect("greeting");
    let mut m = [0u8; 2];
    if s.read_exact(&mut m).is_err() {
        return Err(Socks5Error::Closed);
    }
    assert_eq!(m, [5, method], "method choice");
    if let Some((u, p)) = login {
        let mut req = vec![1, u.len() as u8];
        req.extend_from_slice(u.as_bytes());
        req.push(p.len() as u8);
        req.extend_from_slice(p.as_bytes());
        s.write_all(&req).expect("credentials");
        let mut st = [0u8; 2];
        s.read_exact(&mut st).expect("auth status");
        if st[1] != 0 {
            return Err(Socks5Error::Auth(st[1]));
        }
    }
    let p = target.to_be_bytes();
    s.write_all(&[5, 1, 0, 1, 127, 0, 0, 1, p[0], p[1]])
        .expect("connect request");
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply).expect("connect reply");
    if reply[1] != 0 {
        return Err(Socks5Error::Rep(reply[1]));
    }
    s.write_all(b"ping").expect("ping");
    let mut b = [0u8; 4];
    s.read_exact(&mut b).expect("echo");
    assert_eq!(&b, b"ping");
    Ok(s)
}

/// Kills a supervisor when the test ends, whatever happens.
pub struct Supervisor(pub Child);

impl Drop for Supervisor {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A new pseudo-terminal: (the terminal's other end, the terminal), both close-on-exec.
pub fn openpty() -> (std::os::unix::io::OwnedFd, std::os::unix::io::OwnedFd) {
    use std::os::unix::io::{FromRawFd, OwnedFd};
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty writes two descriptors into the ints we own; the name, settings
    // and size may be NULL.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    for fd in [master, slave] {
        // SAFETY: fcntl on a descriptor we own; no pointer.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    // SAFETY: both descriptors are fresh and owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) }
}

/// Gives `cmd` a new pseudo-terminal as its controlling terminal, stdin and stderr (a
/// session of its own), and returns the terminal's other end, where a test reads what
/// the program shows and types what a user would.
pub fn on_pty(cmd: &mut Command) -> std::fs::File {
    use std::os::unix::process::CommandExt;
    let (master, slave) = openpty();
    cmd.stdin(Stdio::from(slave.try_clone().expect("dup pty")))
        .stderr(Stdio::from(slave));
    // SAFETY: setsid and ioctl are system calls, safe between fork and exec; TIOCSCTTY
    // takes an int argument, no pointer.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    std::fs::File::from(master)
}

/// A program running for the test, its standard error collected line by line.
pub struct Logged {
    pub child: Child,
    pub what: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Logged {
    /// Spawns `cmd` with stderr collected; returns it and its stdout.
    pub fn spawn(cmd: &mut Command, what: &str) -> (Logged, std::process::ChildStdout) {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {what}: {e}"));
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        let err = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(l);
            }
        });
        let out = child.stdout.take().expect("stdout");
        let p = Logged {
            child,
            what: what.to_string(),
            log,
        };
        (p, out)
    }

    pub fn lines(&self, pat: &str) -> Vec<String> {
        let log = self.log.lock().unwrap();
        log.iter().filter(|l| l.contains(pat)).cloned().collect()
    }

    /// Waits (up to 20 s) until `n` lines hold `pat`; returns them.
    pub fn wait_lines(&self, pat: &str, n: usize) -> Vec<String> {
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            let l = self.lines(pat);
            if l.len() >= n {
                return l;
            }
            assert!(
                Instant::now() < end,
                "{} of {n} lines with {pat:?}:{}",
                l.len(),
                self.show()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn show(&self) -> String {
        format!(
            "\n--- {} log:\n{}",
            self.what,
            self.log.lock().unwrap().join("\n")
        )
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `pid` sleeps in poll(2), as a relay does once it is set up.
pub fn wait_until_polling(pid: u32, limit: Duration) {
    let end = std::time::Instant::now() + limit;
    loop {
        let path = format!("/proc/{pid}/syscall");
        let nr = std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<libc::c_long>().ok());
        #[cfg(target_arch = "x86_64")]
        if nr == Some(libc::SYS_poll) {
            return;
        }
        if nr == Some(libc::SYS_ppoll) {
            return;
        }
        assert!(std::time::Instant::now() < end, "{pid} never polled");
        std::thread::sleep(Duration::from_millis(5));
    }
}
