//! SOCKS5 UDP ASSOCIATE and BIND through the real chain (tcpsplice-auth -U/-B →
//! tcpsplice-dial → tcpsplice): real clients (PySocks, dante's socksify running a DNS
//! client), scripted clients that check every byte of the replies and the datagram
//! headers, the rules on every datagram's destination, the source check, and every way
//! an association ends (control connection closed or reset, idle timeout, SIGTERM).
//!
//! Scripted tests run tcpsplice-auth with fds 0/1 on a loopback connection of the test's
//! own, so the association's process is the test's child: its exit, status and log line
//! are seen directly.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::util::{self, Ran};

const AUTH: &str = env!("CARGO_BIN_EXE_tcpsplice-auth");
const DIAL: &str = env!("CARGO_BIN_EXE_tcpsplice-dial");
const SPLICE: &str = env!("CARGO_BIN_EXE_tcpsplice");
const LISTEN: &str = env!("CARGO_BIN_EXE_tcpsplice-listen");
const LIMIT: Duration = Duration::from_secs(30);
/// How long a datagram that should come back may take, and how long one that must not
/// is waited for.
const WAIT: Duration = Duration::from_secs(5);
const QUIET: Duration = Duration::from_millis(400);
const PW: &str = "udp s3cret";

/// A scratch directory of the test's own.
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tcpsplice-udp-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

/// A users file of `user:sha-512(PW)[:rules]` lines (mkpasswd, package whois).
fn users(dir: &std::path::Path, entries: &[(&str, &str)]) -> PathBuf {
    let mut text = String::new();
    for (user, rules) in entries {
        let hash = util::mkpasswd("sha-512", PW);
        text.push_str(&format!("{user}:{hash}"));
        if !rules.is_empty() {
            text.push_str(&format!(":{rules}"));
        }
        text.push('\n');
    }
    let p = dir.join("users");
    std::fs::write(&p, text).expect("write users");
    p
}

/// A UDP echo (or, told not to answer, a canary) that counts what it receives.
struct Echo {
    addr: SocketAddr,
    seen: Arc<AtomicUsize>,
    /// Where the last datagram came from.
    source: Arc<std::sync::Mutex<Option<SocketAddr>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Echo {
    fn start(at: &str, answer: bool) -> Echo {
        let sock = UdpSocket::bind(at).expect("bind echo");
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        let addr = sock.local_addr().expect("addr");
        let seen = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let source = Arc::new(std::sync::Mutex::new(None));
        let (s2, st2, src2) = (seen.clone(), stop.clone(), source.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            let end = Instant::now() + Duration::from_secs(300);
            while !st2.load(Ordering::Relaxed) && Instant::now() < end {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    *src2.lock().unwrap_or_else(|e| e.into_inner()) = Some(from);
                    s2.fetch_add(1, Ordering::Relaxed);
                    if answer {
                        let _ = sock.send_to(&buf[..n], from);
                    }
                }
            }
        });
        Echo {
            addr,
            seen,
            source,
            stop,
            thread: Some(thread),
        }
    }

    fn seen(&self) -> usize {
        self.seen.load(Ordering::Relaxed)
    }

    fn source(&self) -> Option<SocketAddr> {
        *self.source.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A loopback TCP connection whose listening side is at `ip`: (client end, server end).
fn tcp_pair_at(ip: &str) -> (TcpStream, TcpStream) {
    let l = TcpListener::bind(SocketAddr::new(ip.parse().expect("ip"), 0)).expect("bind");
    let c = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
    let s = util::accept_timeout(&l, LIMIT);
    (c, s)
}

/// tcpsplice-auth `auth` → tcpsplice-dial `dial` → tcpsplice, with fds 0/1 on the
/// server end of a connection made at `ip`; returns the running chain and the client
/// end (its control connection).
fn chain_at(ip: &str, auth: &[&str], dial: &[&str]) -> (Child, TcpStream) {
    let (client, server) = tcp_pair_at(ip);
    let so = server.try_clone().expect("dup");
    let mut cmd = Command::new(AUTH);
    cmd.args(auth)
        .arg(DIAL)
        .args(dial)
        .arg(SPLICE)
        .env("TCPSPLICE_LOG", "stderr")
        .stdin(Stdio::from(OwnedFd::from(server)))
        .stdout(Stdio::from(OwnedFd::from(so)))
        .stderr(Stdio::piped());
    for v in [
        "TCPSPLICE_TARGET",
        "TCPSPLICE_COMMAND",
        "TCPSPLICE_REPLY",
        "TCPSPLICE_RULES",
        "TCPSPLICE_CLIENT",
        "TCPSPLICE_USER",
        "TCPREMOTEIP",
        "TCPREMOTEPORT",
        "TCPLOCALIP",
        "TCPLOCALPORT",
    ] {
        cmd.env_remove(v);
    }
    let child = cmd.spawn().expect("spawn tcpsplice-auth");
    client.set_read_timeout(Some(LIMIT)).expect("timeout");
    (child, client)
}

fn chain(auth: &[&str], dial: &[&str]) -> (Child, TcpStream) {
    chain_at("127.0.0.1", auth, dial)
}

/// Reads a SOCKS5 reply: REP and the bound address.
fn read_reply(c: &mut TcpStream) -> (u8, SocketAddr) {
    let mut head = [0u8; 4];
    c.read_exact(&mut head).expect("reply head");
    assert_eq!(head[0], 5, "reply version: {head:?}");
    let ip: IpAddr = match head[3] {
        1 => {
            let mut a = [0u8; 4];
            c.read_exact(&mut a).expect("reply address");
            Ipv4Addr::from(a).into()
        }
        4 => {
            let mut a = [0u8; 16];
            c.read_exact(&mut a).expect("reply address");
            Ipv6Addr::from(a).into()
        }
        other => panic!("reply with ATYP {other}: not an IP"),
    };
    let mut p = [0u8; 2];
    c.read_exact(&mut p).expect("reply port");
    (head[1], SocketAddr::new(ip, u16::from_be_bytes(p)))
}

/// The address bytes of a SOCKS5 request or datagram header: ATYP, address, port.
fn address(a: SocketAddr) -> Vec<u8> {
    let mut v = Vec::new();
    match a.ip() {
        IpAddr::V4(ip) => {
            v.push(1);
            v.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            v.push(4);
            v.extend_from_slice(&ip.octets());
        }
    }
    v.extend_from_slice(&a.port().to_be_bytes());
    v
}

fn name_address(name: &str, port: u16) -> Vec<u8> {
    let mut v = vec![3, name.len() as u8];
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&port.to_be_bytes());
    v
}

/// Greets with no-auth, or logs in as `user` when given, then sends `cmd` with `addr`
/// and reads the first reply.
fn request(c: &mut TcpStream, user: Option<&str>, cmd: u8, addr: &[u8]) -> (u8, SocketAddr) {
    let method = if user.is_some() { 2 } else { 0 };
    c.write_all(&[5, 1, method]).expect("greeting");
    let mut m = [0u8; 2];
    c.read_exact(&mut m).expect("method");
    assert_eq!(m, [5, method]);
    if let Some(u) = user {
        let mut a = vec![1, u.len() as u8];
        a.extend_from_slice(u.as_bytes());
        a.push(PW.len() as u8);
        a.extend_from_slice(PW.as_bytes());
        c.write_all(&a).expect("login");
        c.read_exact(&mut m).expect("login status");
        assert_eq!(m, [1, 0], "login refused");
    }
    let mut r = vec![5, cmd, 0];
    r.extend_from_slice(addr);
    c.write_all(&r).expect("request");
    read_reply(c)
}

/// UDP ASSOCIATE with an all-zero address, as tun2socks sends it: the relay's address.
fn associate(c: &mut TcpStream, user: Option<&str>) -> SocketAddr {
    let (rep, relay) = request(c, user, 3, &[1, 0, 0, 0, 0, 0, 0]);
    assert_eq!(rep, 0, "UDP ASSOCIATE refused");
    relay
}

/// An echo on 127.0.0.1 and a no-auth association whose dialer (`dial` options, then
/// one rule) allows only that echo: the echo, the chain, its control connection and the
/// relay's address.
fn echo_association(dial: &[&str]) -> (Echo, Child, TcpStream, SocketAddr) {
    let echo = Echo::start("127.0.0.1:0", true);
    let (child, ctl, relay) = association_for(&echo, dial);
    (echo, child, ctl, relay)
}

/// A no-auth association whose dialer (`dial` options, then one rule) allows `echo`.
fn association_for(echo: &Echo, dial: &[&str]) -> (Child, TcpStream, SocketAddr) {
    let allow = format!("127.0.0.1:{}", echo.addr.port());
    let mut args = dial.to_vec();
    args.extend(["-a", allow.as_str()]);
    let (child, mut ctl) = chain(&["-n", "-U"], &args);
    let relay = associate(&mut ctl, None);
    (child, ctl, relay)
}

/// A datagram for the relay: header for `to`, then `payload`.
fn wrap(to: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut d = vec![0, 0, 0];
    d.extend_from_slice(to);
    d.extend_from_slice(payload);
    d
}

/// Waits for a datagram from the relay and splits it: source named in the header, and
/// the payload. None when nothing comes within `wait`.
fn recv_wrapped(u: &UdpSocket, wait: Duration) -> Option<(SocketAddr, Vec<u8>)> {
    u.set_read_timeout(Some(wait)).expect("timeout");
    let mut buf = vec![0u8; 65600];
    let (n, _) = u.recv_from(&mut buf).ok()?;
    let d = &buf[..n];
    assert_eq!(&d[..3], &[0, 0, 0], "reply header: {:?}", &d[..n.min(24)]);
    let (ip, rest): (IpAddr, &[u8]) = match d[3] {
        1 => (
            Ipv4Addr::from(<[u8; 4]>::try_from(&d[4..8]).expect("v4")).into(),
            &d[8..],
        ),
        4 => (
            Ipv6Addr::from(<[u8; 16]>::try_from(&d[4..20]).expect("v6")).into(),
            &d[20..],
        ),
        other => panic!("a reply's source has ATYP {other}: not an IP"),
    };
    let port = u16::from_be_bytes([rest[0], rest[1]]);
    Some((SocketAddr::new(ip, port), rest[2..].to_vec()))
}

/// Sends `payload` to `to` through the relay and expects it echoed from `from`.
fn echo_through(u: &UdpSocket, relay: SocketAddr, to: &[u8], from: SocketAddr, payload: &[u8]) {
    u.send_to(&wrap(to, payload), relay).expect("send");
    let (src, got) = recv_wrapped(u, WAIT).expect("no echo came back through the relay");
    assert_eq!(src, from, "the reply names another source");
    assert_eq!(got, payload, "the echo differs");
}

/// Ends the control connection and collects the chain.
fn end(child: Child, ctl: TcpStream) -> Ran {
    drop(ctl);
    util::finish(child, "tcpsplice-auth (UDP)", LIMIT)
}

/// The relay's end line.
fn end_line(r: &Ran) -> String {
    r.stderr_text()
        .lines()
        .find(|l| l.contains("tcpsplice-dial: info: end "))
        .unwrap_or_else(|| panic!("no end line{}", r.show()))
        .to_string()
}

fn field<'a>(line: &'a str, name: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no {name}= in {line}"))
}

const PYSOCKS_CLIENT: &str = r#"
import socket, sys, hashlib
import socks
proxy_port, user, pw = int(sys.argv[1]), sys.argv[2], sys.argv[3]
s = socks.socksocket(socket.AF_INET, socket.SOCK_DGRAM)
s.set_proxy(socks.SOCKS5, "127.0.0.1", proxy_port, username=user, password=pw)
s.settimeout(10)
sizes = [int(x) for x in sys.argv[5].split(",")]
n = 0
for dst in sys.argv[4].split(","):
    host, port = dst.rsplit(":", 1)
    host = host.strip("[]")
    for size in sizes:
        data = hashlib.sha256(b"%d %s" % (size, dst.encode())).digest() * (size // 32 + 1)
        data = data[:size]
        s.sendto(data, (host, int(port)))
        got, frm = s.recvfrom(70000)
        if got != data:
            print("MISMATCH", dst, size, len(got)); sys.exit(1)
        if frm[0] != host or frm[1] != int(port):
            print("SOURCE", dst, frm); sys.exit(1)
        n += 1
print("OK", n)
"#;

/// Starts tcpsplice-listen on 127.0.0.1 with `prog`: the listener and its port.
fn listener(prog: &[&str]) -> (Child, u16) {
    let mut l = Command::new(LISTEN)
        .args(["-1", "127.0.0.1", "0"])
        .args(prog)
        .env("TCPSPLICE_LOG", "stderr")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tcpsplice-listen");
    let mut line = String::new();
    BufReader::new(l.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("bound port");
    let port = line.trim().parse().expect("bound port");
    (l, port)
}

/// tcpsplice-listen → tcpsplice-auth -U -f USERS → tcpsplice-dial with an `-a` for each
/// of `allow` → tcpsplice: the listener and its port.
fn login_proxy(users: &std::path::Path, allow: &[String]) -> (Child, u16) {
    let users = users.to_str().expect("path");
    let mut prog = vec![AUTH, "-U", "-f", users, DIAL];
    for a in allow {
        prog.extend(["-a", a.as_str()]);
    }
    prog.push(SPLICE);
    listener(&prog)
}

fn stop_listener(l: Child) -> Ran {
    // SAFETY: kill with the pid of a child we spawned.
    unsafe { libc::kill(l.id() as i32, libc::SIGTERM) };
    util::finish(l, "tcpsplice-listen", LIMIT)
}

#[test]
fn pysocks_udp_with_a_login_to_ipv4_and_ipv6_echoes_1_to_65000_bytes() {
    let dir = scratch("pysocks");
    let users = users(&dir, &[("alice", "")]);
    let e4 = Echo::start("127.0.0.1:0", true);
    let e6 = Echo::start("[::1]:0", true);
    let (a4, a6) = (e4.addr.to_string(), e6.addr.to_string());
    let (l, port) = login_proxy(
        &users,
        &[
            format!("127.0.0.1:{}", e4.addr.port()),
            format!("[::1]:{}", e6.addr.port()),
        ],
    );
    let sizes = "1,2,7,100,512,1400,1472,1500,4096,9000,16384,32768,50000,65000";
    let py = util::run(
        Command::new("/usr/bin/python3").args([
            "-c",
            PYSOCKS_CLIENT,
            &port.to_string(),
            "alice",
            PW,
            &format!("{a4},{a6}"),
            sizes,
        ]),
        LIMIT,
    );
    let log = stop_listener(l);
    assert!(
        py.status.success() && py.stderr.is_empty(),
        "PySocks (package python3-socks) failed{}{}",
        py.show(),
        log.show()
    );
    let n = sizes.split(',').count();
    assert_eq!(
        String::from_utf8_lossy(&py.stdout).trim(),
        format!("OK {}", 2 * n)
    );
    let line = end_line(&log);
    assert_eq!(field(&line, "user"), "alice", "{line}");
    assert_eq!(field(&line, "up_dgrams"), (2 * n).to_string(), "{line}");
    assert_eq!(field(&line, "down_dgrams"), (2 * n).to_string(), "{line}");
    let bytes: usize = sizes.split(',').map(|s| s.parse::<usize>().unwrap()).sum();
    assert_eq!(field(&line, "up_bytes"), (2 * bytes).to_string(), "{line}");
    assert_eq!(
        field(&line, "down_bytes"),
        (2 * bytes).to_string(),
        "{line}"
    );
    assert_eq!(field(&line, "dests"), "2", "{line}");
    assert_eq!(field(&line, "refused"), "0", "{line}");
    assert_eq!(field(&line, "how"), "eof", "{line}");
    // The echoes were reached from the relay, not from the client directly.
    assert_eq!(e4.seen(), n);
    assert_eq!(e6.seen(), n);
}

/// A DNS responder for one name: answers every A query with 192.0.2.55.
const DNS_RESPONDER: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 0))
s.settimeout(30)
print(s.getsockname()[1], flush=True)
while True:
    try:
        q, peer = s.recvfrom(4096)
    except socket.timeout:
        break
    if len(q) < 12:
        continue
    i = 12
    while i < len(q) and q[i] != 0:
        i += q[i] + 1
    question = q[12:i + 5]
    head = q[:2] + b"\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00"
    answer = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04" + bytes([192, 0, 2, 55])
    s.sendto(head + question + answer, peer)
    print("query from %s:%d" % peer, flush=True)
"#;

#[test]
fn socksify_runs_a_dns_client_through_the_relay() {
    // dante-client's LD_PRELOAD library wraps sendto/recvfrom; drill (ldnsutils) uses
    // them. dig 9.18 sends with sendmmsg(2), which the library does not wrap, so its
    // queries would reach the relay without a SOCKS header (and be dropped, counted).
    let dir = scratch("socksify");
    let users = users(&dir, &[("alice", "")]);
    let mut dns = Command::new("/usr/bin/python3")
        .args(["-c", DNS_RESPONDER])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut out = BufReader::new(dns.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("dns port");
    let dns_port: u16 = line.trim().parse().expect("dns port");
    let (l, port) = login_proxy(&users, &[format!("127.0.0.1:{dns_port}")]);
    let conf = dir.join("socks.conf");
    std::fs::write(
        &conf,
        format!(
            "route {{\n  from: 0.0.0.0/0 to: 0.0.0.0/0 via: 127.0.0.1 port = {port}\n  \
             proxyprotocol: socks_v5\n  command: udpassociate connect\n  method: username\n}}\n"
        ),
    )
    .expect("socks.conf");
    let drill = util::run(
        Command::new("socksify")
            .args([
                "drill",
                "-p",
                &dns_port.to_string(),
                "example.test",
                "A",
                "@127.0.0.1",
            ])
            .env("SOCKS_CONF", &conf)
            // Else dante's library goes direct to addresses on this host's networks.
            .env("SOCKS_AUTOADD_LANROUTES", "no")
            .env("SOCKS_USERNAME", "alice")
            .env("SOCKS_PASSWORD", PW),
        LIMIT,
    );
    let log = stop_listener(l);
    let _ = dns.kill();
    let _ = dns.wait();
    let mut seen = String::new();
    let _ = out.read_to_string(&mut seen);
    let text = String::from_utf8_lossy(&drill.stdout);
    assert!(
        drill.status.success() && text.contains("192.0.2.55"),
        "socksify drill (dante-client, ldnsutils) got no answer{}{}",
        drill.show(),
        log.show()
    );
    let line = end_line(&log);
    assert_eq!(field(&line, "up_dgrams"), "1", "{line}{}", drill.show());
    assert_eq!(field(&line, "down_dgrams"), "1", "{line}");
    // The query came from the relay's outbound socket, not from drill's.
    let relay_client = field(&line, "client_udp");
    assert!(seen.contains("query from 127.0.0.1:"), "{seen}");
    assert!(!seen.contains(relay_client), "{seen} {line}");
}

#[test]
fn a_datagram_to_a_destination_no_rule_allows_never_arrives() {
    let echo = Echo::start("127.0.0.1:0", true);
    let canary = Echo::start("127.0.0.1:0", false);
    let allow = format!("127.0.0.1:{}", echo.addr.port());
    let (child, mut ctl) = chain(&["-n", "-U"], &["-a", &allow]);
    let relay = associate(&mut ctl, None);
    let u = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let mapped = SocketAddr::new(
        Ipv4Addr::LOCALHOST.to_ipv6_mapped().into(),
        canary.addr.port(),
    );
    for to in [
        address(canary.addr),
        address(mapped),
        name_address("localhost", canary.addr.port()),
        // Loopback, but not the one the rule names.
        address(SocketAddr::new([127, 0, 0, 2].into(), echo.addr.port())),
    ] {
        u.send_to(&wrap(&to, b"canary"), relay).expect("send");
    }
    // Then what the rule allows, by address and by name: sent after, echoed, so the
    // refused ones had their chance to arrive.
    echo_through(&u, relay, &address(echo.addr), echo.addr, b"allowed");
    echo_through(
        &u,
        relay,
        &name_address("localhost", echo.addr.port()),
        echo.addr,
        b"by name",
    );
    std::thread::sleep(QUIET);
    assert_eq!(canary.seen(), 0, "a refused datagram reached the canary");
    assert!(
        recv_wrapped(&u, QUIET).is_none(),
        "an extra datagram came back"
    );
    let r = end(child, ctl);
    r.expect_code(0);
    let line = end_line(&r);
    assert_eq!(field(&line, "refused"), "4", "{line}");
    assert_eq!(field(&line, "up_dgrams"), "2", "{line}");
    assert_eq!(echo.seen(), 2);
    assert!(
        r.stderr_text().contains("udp: not sending to 127.0.0.1:"),
        "{}",
        r.show()
    );

    // No rule at all: the deny list refuses loopback, the echo included.
    let (child, mut ctl) = chain(&["-n", "-U"], &[]);
    let relay = associate(&mut ctl, None);
    u.send_to(&wrap(&address(echo.addr), b"x"), relay)
        .expect("send");
    assert!(recv_wrapped(&u, QUIET).is_none(), "loopback was reached");
    let r = end(child, ctl);
    let line = end_line(&r);
    assert_eq!(field(&line, "refused"), "1", "{line}");
    assert_eq!(echo.seen(), 2);
    assert!(r.stderr_text().contains("loopback"), "{}", r.show());
}

#[test]
fn the_users_rules_restrict_datagrams_too() {
    let echo = Echo::start("127.0.0.1:0", true);
    let canary = Echo::start("127.0.0.1:0", false);
    let dir = scratch("userrules");
    let users = users(&dir, &[("bob", &format!("127.0.0.1:{}", echo.addr.port()))]);
    let (child, mut ctl) = chain(
        &["-U", "-f", users.to_str().expect("path")],
        &["-a", "127.0.0.0/8"],
    );
    let relay = associate(&mut ctl, Some("bob"));
    let u = UdpSocket::bind("127.0.0.1:0").expect("bind");
    u.send_to(&wrap(&address(canary.addr), b"no"), relay)
        .expect("send");
    echo_through(&u, relay, &address(echo.addr), echo.addr, b"yes");
    std::thread::sleep(QUIET);
    assert_eq!(canary.seen(), 0, "the user's rules were not applied");
    let r = end(child, ctl);
    let line = end_line(&r);
    assert_eq!(field(&line, "user"), "bob", "{line}");
    assert_eq!(field(&line, "refused"), "1", "{line}");
    assert!(r.stderr_text().contains("TCPSPLICE_RULES"), "{}", r.show());
}

#[test]
fn datagrams_from_another_source_address_are_dropped_unless_m() {
    let (echo, child, ctl, relay) = echo_association(&[]);
    // From 127.0.0.2, while the control connection is from 127.0.0.1: dropped, and it
    // does not become the client either.
    let stranger = UdpSocket::bind("127.0.0.2:0").expect("bind 127.0.0.2");
    stranger
        .send_to(&wrap(&address(echo.addr), b"stranger"), relay)
        .expect("send");
    std::thread::sleep(QUIET);
    assert_eq!(
        echo.seen(),
        0,
        "a datagram from another address was relayed"
    );
    // The client's first datagram fixes its port ...
    let u = UdpSocket::bind("127.0.0.1:0").expect("bind");
    echo_through(&u, relay, &address(echo.addr), echo.addr, b"client");
    // ... so another port of the same address is not the client.
    let other = UdpSocket::bind("127.0.0.1:0").expect("bind");
    other
        .send_to(&wrap(&address(echo.addr), b"other port"), relay)
        .expect("send");
    assert!(recv_wrapped(&other, QUIET).is_none());
    assert!(recv_wrapped(&stranger, Duration::from_millis(50)).is_none());
    assert_eq!(echo.seen(), 1);
    let r = end(child, ctl);
    let line = end_line(&r);
    assert_eq!(field(&line, "foreign"), "2", "{line}");
    assert_eq!(field(&line, "up_dgrams"), "1", "{line}");

    // With -m a multi-homed client's datagrams from another address are taken.
    let (child, ctl, relay) = association_for(&echo, &["-m"]);
    echo_through(&stranger, relay, &address(echo.addr), echo.addr, b"-m");
    let r = end(child, ctl);
    assert_eq!(field(&end_line(&r), "foreign"), "0");
}

#[test]
fn only_destinations_the_client_sent_to_may_answer() {
    let (echo, child, ctl, relay) = echo_association(&[]);
    let u = UdpSocket::bind("127.0.0.1:0").expect("bind");
    echo_through(&u, relay, &address(echo.addr), echo.addr, b"hello");
    // The relay's outbound socket, as the echo saw it: anyone else who writes to it,
    // even from the echo's own address, is not relayed to the client.
    let outbound = echo.source().expect("the echo saw the relay");
    assert_ne!(outbound, u.local_addr().expect("addr"));
    let other = UdpSocket::bind("127.0.0.1:0").expect("bind");
    other.send_to(b"unsolicited", outbound).expect("send");
    assert!(
        recv_wrapped(&u, QUIET).is_none(),
        "an unsolicited datagram came through"
    );
    echo_through(&u, relay, &address(echo.addr), echo.addr, b"still");
    let r = end(child, ctl);
    assert_eq!(field(&end_line(&r), "dropped"), "1");
}

/// The resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

#[test]
fn memory_stays_bounded_however_many_destinations() {
    // Every port of 127.0.0.1 is allowed: each datagram goes to a new destination, which
    // the relay remembers (for replies) and judges (a cached verdict), up to a bound.
    let (child, mut ctl) = chain(&["-n", "-U"], &["-a", "127.0.0.1"]);
    let relay = associate(&mut ctl, None);
    let u = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let mut sent = 0u32;
    let mut send_to_new_ports = |n: u32| {
        for _ in 0..n {
            let port = 10000 + (sent % 50000) as u16;
            sent += 1;
            let to = address(SocketAddr::new([127, 0, 0, 1].into(), port));
            u.send_to(&wrap(&to, b"x"), relay).expect("send");
            // Slower than the relay judges new destinations (a netlink request each in a
            // debug build), so that most are not lost to a full socket buffer.
            if sent % 20 == 0 {
                std::thread::sleep(Duration::from_millis(3));
            }
        }
    };
    // Past the table's bound (4096) once, then three times as many again.
    send_to_new_ports(6000);
    std::thread::sleep(Duration::from_millis(500));
    let after_first = rss_kib(child.id());
    send_to_new_ports(18000);
    std::thread::sleep(Duration::from_millis(500));
    let after_more = rss_kib(child.id());
    assert!(
        after_more <= after_first + 1024,
        "the relay grew from {after_first} to {after_more} KiB with 18000 more destinations"
    );
    let r = end(child, ctl);
    let line = end_line(&r);
    let relayed: u32 = field(&line, "up_dgrams").parse().expect("number");
    // A datagram or two lost to a full socket buffer would not matter; most must go.
    assert!(relayed > 18000, "{line}");
    assert_eq!(field(&line, "dests"), relayed.to_string(), "{line}");
}

#[test]
fn fragments_and_malformed_datagrams_are_dropped_and_the_relay_goes_on() {
    let (echo, child, ctl, relay) = echo_association(&[]);
    let u = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let mut frag = wrap(&address(echo.addr), b"fragment");
    frag[2] = 1;
    for d in [
        frag,
        vec![0, 0],
        vec![0, 0, 0, 9, 1, 2, 3, 4, 0, 1],
        wrap(&name_address("bad name", echo.addr.port()), b"x"),
        wrap(
            &address(SocketAddr::new([127, 0, 0, 1].into(), 0)),
            b"port 0",
        ),
    ] {
        u.send_to(&d, relay).expect("send");
    }
    echo_through(&u, relay, &address(echo.addr), echo.addr, b"whole");
    assert_eq!(
        echo.seen(),
        1,
        "a fragment or a malformed datagram went out"
    );
    let r = end(child, ctl);
    let line = end_line(&r);
    assert_eq!(field(&line, "dropped"), "5", "{line}");
}

#[test]
fn the_reply_names_the_address_the_client_reached_or_the_advertised_one() {
    let echo = Echo::start("127.0.0.1:0", true);
    let allow = format!("127.0.0.1:{}", echo.addr.port());
    // Reached at 127.0.0.3: the relay is bound there, never to the wildcard.
    let (child, mut ctl) = chain_at("127.0.0.3", &["-n", "-U"], &["-a", &allow]);
    let relay = associate(&mut ctl, None);
    assert_eq!(relay.ip(), IpAddr::from([127, 0, 0, 3]));
    assert_ne!(relay.port(), 0);
    let u = UdpSocket::bind("127.0.0.1:0").expect("bind");
    echo_through(&u, relay, &address(echo.addr), echo.addr, b"at .3");
    // Nothing answers at the same port on another address of the host.
    let elsewhere = SocketAddr::new([127, 0, 0, 1].into(), relay.port());
    u.send_to(&wrap(&address(echo.addr), b"x"), elsewhere)
        .expect("send");
    assert!(
        recv_wrapped(&u, QUIET).is_none(),
        "the relay is bound wider"
    );
    end(child, ctl).expect_code(0);

    // -A: the reply names the public address; the relay is where it was.
    let (child, mut ctl) = chain(&["-n", "-U"], &["-A", "192.0.2.1", "-a", &allow]);
    let shown = associate(&mut ctl, None);
    assert_eq!(shown.ip(), IpAddr::from([192, 0, 2, 1]));
    let relay = SocketAddr::new([127, 0, 0, 1].into(), shown.port());
    echo_through(&u, relay, &address(echo.addr), echo.addr, b"-A");
    end(child, ctl).expect_code(0);
}

#[test]
fn over_ipv6_the_reply_and_the_sources_are_ipv6() {
    let echo = Echo::start("[::1]:0", true);
    let allow = format!("[::1]:{}", echo.addr.port());
    let (child, mut ctl) = chain_at("::1", &["-n", "-U"], &["-a", &allow]);
    let relay = associate(&mut ctl, None);
    assert_eq!(relay.ip(), IpAddr::from(Ipv6Addr::LOCALHOST), "{relay}");
    let u = UdpSocket::bind("[::1]:0").expect("bind");
    for n in [1usize, 1400, 65000] {
        echo_through(
            &u,
            relay,
            &address(echo.addr),
            echo.addr,
            &util::pattern(n as u64, n),
        );
    }
    let r = end(child, ctl);
    assert_eq!(field(&end_line(&r), "down_dgrams"), "3");
}

/// Whether the relay port answers: a datagram to the echo, and its echo.
fn answers(u: &UdpSocket, relay: SocketAddr, echo: SocketAddr) -> bool {
    let _ = u.send_to(&wrap(&address(echo), b"ping"), relay);
    recv_wrapped(u, QUIET).is_some()
}

/// Whether the relay still relays: a datagram to the echo comes back wrapped, from the
/// echo. For a relay that has ended, whose port another test's socket may have taken
/// since (a stray datagram from it is not an answer of the relay's).
fn still_relays(u: &UdpSocket, relay: SocketAddr, echo: SocketAddr) -> bool {
    let _ = u.send_to(&wrap(&address(echo), b"ping"), relay);
    let _ = u.set_read_timeout(Some(QUIET));
    let mut buf = vec![0u8; 65600];
    let Ok((n, _)) = u.recv_from(&mut buf) else {
        return false;
    };
    let want = wrap(&address(echo), b"ping");
    buf[..n] == want[..]
}

fn wait_exit(child: Child, within: Duration) -> (Ran, Duration) {
    let t = Instant::now();
    let r = util::finish(child, "tcpsplice-auth (UDP)", within);
    (r, t.elapsed())
}

#[test]
fn closing_or_resetting_the_control_connection_ends_the_association() {
    let u = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let (echo, child, mut ctl, relay) = echo_association(&[]);
    // The check the ended relay must fail, passed by a live one.
    assert!(still_relays(&u, relay, echo.addr), "a live relay's echo");
    assert!(answers(&u, relay, echo.addr));
    // Bytes on the control connection do not end it; its end of file does.
    ctl.write_all(b"ignored").expect("write");
    assert!(answers(&u, relay, echo.addr));
    drop(ctl);
    let (r, took) = wait_exit(child, Duration::from_secs(5));
    r.expect_code(0);
    assert!(took < Duration::from_secs(3), "took {took:?}");
    assert_eq!(field(&end_line(&r), "how"), "eof");
    assert!(
        !still_relays(&u, relay, echo.addr),
        "the relay port still answers"
    );

    let (child, ctl, relay) = association_for(&echo, &[]);
    assert!(answers(&u, relay, echo.addr));
    // SO_LINGER 0, then close: a reset.
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt reads the linger struct we own, of the size given.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&ctl),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0);
    drop(ctl);
    let (r, _) = wait_exit(child, Duration::from_secs(5));
    r.expect_code(1);
    assert_eq!(field(&end_line(&r), "how"), "reset-by-client");
    assert!(
        !still_relays(&u, relay, echo.addr),
        "the relay port still answers"
    );
}

#[test]
fn the_idle_timeout_slides_with_traffic_and_then_ends_the_association() {
    let (echo, mut child, ctl, relay) = echo_association(&["-i", "1"]);
    let u = UdpSocket::bind("127.0.0.1:0").expect("bind");
    // No deadline on the first datagram shorter than the idle timeout; then traffic
    // every 0.4 s keeps a 1 s timeout from firing for 2.4 s.
    std::thread::sleep(Duration::from_millis(500));
    for _ in 0..6 {
        assert!(answers(&u, relay, echo.addr), "ended while in use");
        std::thread::sleep(Duration::from_millis(400));
    }
    assert!(child.try_wait().expect("try_wait").is_none());
    let last = Instant::now();
    let (r, _) = wait_exit(child, Duration::from_secs(5));
    let quiet = last.elapsed();
    r.expect_code(1);
    assert_eq!(field(&end_line(&r), "how"), "idle-timeout");
    assert!(quiet >= Duration::from_millis(500), "ended after {quiet:?}");
    assert!(!still_relays(&u, relay, echo.addr));
    drop(ctl);
}

#[test]
fn sigterm_ends_the_association() {
    let (child, mut ctl) = chain(&["-n", "-U"], &[]);
    associate(&mut ctl, None);
    // SAFETY: kill with the pid of a child we spawned.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let (r, _) = wait_exit(child, Duration::from_secs(5));
    r.expect_code(1);
    assert_eq!(field(&end_line(&r), "how"), "signal-15");
    drop(ctl);
}

#[test]
fn udp_and_bind_are_off_unless_asked_for_and_exported_when_they_are() {
    for (cmd, opt) in [(3u8, "-U"), (2u8, "-B")] {
        let (child, mut ctl) = chain(&["-n"], &[]);
        let (rep, _) = request(&mut ctl, None, cmd, &[1, 127, 0, 0, 1, 0, 0]);
        assert_eq!(rep, 7, "command {cmd} without {opt}");
        end(child, ctl).expect_code(1);
    }
    // What the next program is told: the command and the address the client gave.
    let (client, server) = util::tcp_pair();
    let so = server.try_clone().expect("dup");
    let mut child = Command::new(AUTH)
        .args([
            "-n",
            "-U",
            "sh",
            "-c",
            "echo \"[$TCPSPLICE_COMMAND $TCPSPLICE_TARGET]\" >&2",
        ])
        .env("TCPSPLICE_LOG", "stderr")
        .stdin(Stdio::from(OwnedFd::from(server)))
        .stdout(Stdio::from(OwnedFd::from(so)))
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut c = client;
    c.write_all(b"\x05\x01\x00\x05\x03\x00\x03\x010\x12\x34")
        .expect("write");
    let mut m = [0u8; 2];
    c.read_exact(&mut m).expect("method");
    let mut err = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .expect("read");
    let _ = util::wait_timeout(&mut child, LIMIT);
    assert!(err.contains("[udp 0:4660]"), "{err}");
}

/// A BIND request for `peer`: the chain, the control connection and the first reply.
fn bind(peer: &[u8], dial: &[&str]) -> (Child, TcpStream, u8, SocketAddr) {
    let (child, mut ctl) = chain(&["-n", "-B"], dial);
    let (rep, at) = request(&mut ctl, None, 2, peer);
    (child, ctl, rep, at)
}

fn sockaddr_in(ip: Ipv4Addr, port: u16) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// Connects to `at` from `from`, an IPv4 address of this host (std cannot bind before
/// it connects).
fn connect_from(from: &str, at: SocketAddr) -> TcpStream {
    let (SocketAddr::V4(at), Ok(from)) = (at, from.parse::<Ipv4Addr>()) else {
        panic!("IPv4 only: {from} -> {at}")
    };
    // SAFETY: socket takes three integers; the result is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: fd is a new descriptor nothing else owns.
    let owned = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let here = sockaddr_in(from, 0);
    let there = sockaddr_in(*at.ip(), at.port());
    // SAFETY: bind and connect read the sockaddr_in we own, of the size given.
    let rc = unsafe {
        match libc::bind(fd, (&here as *const libc::sockaddr_in).cast(), len) {
            0 => libc::connect(fd, (&there as *const libc::sockaddr_in).cast(), len),
            e => e,
        }
    };
    assert_eq!(rc, 0, "{from} -> {at}: {}", std::io::Error::last_os_error());
    let s = TcpStream::from(owned);
    s.set_read_timeout(Some(LIMIT)).expect("timeout");
    s
}

#[test]
fn bind_replies_twice_and_splices_the_peer_that_connects_back() {
    let (child, mut ctl, rep, at) = bind(
        &address(SocketAddr::new([127, 0, 0, 1].into(), 0)),
        &["-a", "127.0.0.1"],
    );
    assert_eq!(rep, 0);
    assert_eq!(
        at.ip(),
        IpAddr::from([127, 0, 0, 1]),
        "listening elsewhere: {at}"
    );
    let mut peer = connect_from("127.0.0.1", at);
    let (rep, named) = read_reply(&mut ctl);
    assert_eq!(rep, 0);
    assert_eq!(named, peer.local_addr().expect("addr"), "the second reply");
    // Then the splicer relays both ways, as for CONNECT.
    ctl.write_all(b"from the client").expect("write");
    ctl.shutdown(std::net::Shutdown::Write).expect("shutdown");
    let mut got = Vec::new();
    peer.read_to_end(&mut got).expect("peer read");
    assert_eq!(got, b"from the client");
    peer.write_all(b"from the peer").expect("peer write");
    drop(peer);
    let mut back = Vec::new();
    ctl.read_to_end(&mut back).expect("client read");
    assert_eq!(back, b"from the peer");
    let r = util::finish(child, "tcpsplice-auth (BIND)", LIMIT);
    r.expect_code(0);
    assert!(
        r.stderr_text().contains("tcpsplice: info: end "),
        "{}",
        r.show()
    );
}

#[test]
fn bind_resets_a_peer_from_another_address_and_waits_for_the_named_one() {
    let (child, mut ctl, rep, at) = bind(
        &address(SocketAddr::new([127, 0, 0, 2].into(), 0)),
        &["-a", "127.0.0.0/8"],
    );
    assert_eq!(rep, 0);
    let mut wrong = connect_from("127.0.0.1", at);
    let mut buf = [0u8; 16];
    match wrong.read(&mut buf) {
        Ok(0) | Err(_) => {}
        Ok(n) => panic!("the wrong peer got {n} bytes"),
    }
    let mut right = connect_from("127.0.0.2", at);
    let (rep, named) = read_reply(&mut ctl);
    assert_eq!(rep, 0);
    assert_eq!(named.ip(), IpAddr::from([127, 0, 0, 2]));
    right.write_all(b"ok").expect("write");
    drop(right);
    let mut back = Vec::new();
    ctl.read_to_end(&mut back).expect("read");
    assert_eq!(back, b"ok");
    drop(ctl);
    let r = util::finish(child, "tcpsplice-auth (BIND)", LIMIT);
    assert!(
        r.stderr_text()
            .contains("refused a connection from 127.0.0.1:"),
        "{}",
        r.show()
    );
}

#[test]
fn bind_for_a_peer_the_rules_refuse_or_that_never_comes_fails() {
    // No rule: loopback is denied, REP 02 as the first reply.
    let (child, ctl, rep, _) = bind(&address(SocketAddr::new([127, 0, 0, 1].into(), 21)), &[]);
    assert_eq!(rep, 2);
    let r = end(child, ctl);
    r.expect_code(1);
    // Allowed, but nobody connects within -b: the second reply is REP 06.
    let (child, mut ctl, rep, _) = bind(
        &address(SocketAddr::new([127, 0, 0, 1].into(), 0)),
        &["-b", "0.5", "-a", "127.0.0.1"],
    );
    assert_eq!(rep, 0);
    let t = Instant::now();
    let (rep, _) = read_reply(&mut ctl);
    assert_eq!(rep, 6);
    assert!(t.elapsed() < Duration::from_secs(5));
    end(child, ctl).expect_code(111);
    // The client leaves first: no wait for the peer.
    let (child, ctl, rep, _) = bind(
        &address(SocketAddr::new([127, 0, 0, 1].into(), 0)),
        &["-a", "127.0.0.1"],
    );
    assert_eq!(rep, 0);
    let (r, took) = wait_exit_after(child, ctl, Duration::from_secs(10));
    r.expect_code(1);
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(
        r.stderr_text().contains("before a peer came"),
        "{}",
        r.show()
    );
}

/// Closes the control connection and waits for the chain's end: the run and how long.
fn wait_exit_after(child: Child, ctl: TcpStream, within: Duration) -> (Ran, Duration) {
    drop(ctl);
    wait_exit(child, within)
}
