//! Behind a load balancer: tcpsplice-listen -P behind a real haproxy (send-proxy-v2 and
//! send-proxy, two instances, health checks), curl --haproxy-protocol as a v1 sender,
//! the connections that must be dropped, tcpsplice-proxy under tcpserver and
//! systemd-socket-activate, and the per-user cap of tcpsplice-auth (-l, conns=N).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use crate::util::{self, Logged};

const LISTEN: &str = env!("CARGO_BIN_EXE_tcpsplice-listen");
const AUTH: &str = env!("CARGO_BIN_EXE_tcpsplice-auth");
const DIAL: &str = env!("CARGO_BIN_EXE_tcpsplice-dial");
const SPLICE: &str = env!("CARGO_BIN_EXE_tcpsplice");
const PROXY: &str = env!("CARGO_BIN_EXE_tcpsplice-proxy");
const LIMIT: Duration = Duration::from_secs(20);

/// A program for a chain that shows what it was told of the connection (client, then
/// the address it connected to, then a variable that described the balancer's
/// connection), then echoes.
const SHOW_ENV: &str = r#"printf '%s %s %s %s %s\n' "$TCPREMOTEIP" "$TCPREMOTEPORT" "$TCPLOCALIP" "$TCPLOCALPORT" "${TCPLOCALHOST-none}"; exec cat"#;

const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tcpsplice-proxyin-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

fn free_port() -> u16 {
    let (l, a) = util::listener();
    drop(l);
    a.port()
}

/// tcpsplice-listen on an ephemeral loopback port.
struct Listen {
    p: Logged,
    port: u16,
}

fn listen(opts: &[&str], prog: &[&str], env: &[(&str, &str)]) -> Listen {
    let (p, out) = Logged::spawn(
        Command::new(LISTEN)
            .args(opts)
            .args(["-1", "127.0.0.1", "0"])
            .args(prog)
            .env("TCPSPLICE_LOG", "stderr")
            .envs(env.iter().copied()),
        "tcpsplice-listen",
    );
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(out).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(LIMIT).unwrap_or_default();
    let port = line
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("no port printed: {line:?}{}", p.show()));
    Listen { p, port }
}

/// The lines of both instances that hold `pat`, waiting until there are `n`.
fn wait_both(a: &Listen, b: &Listen, pat: &str, n: usize) -> Vec<String> {
    let end = Instant::now() + LIMIT;
    loop {
        let mut l = a.p.lines(pat);
        l.extend(b.p.lines(pat));
        if l.len() >= n {
            return l;
        }
        assert!(
            Instant::now() < end,
            "{} of {n} lines with {pat:?}:{}{}",
            l.len(),
            a.p.show(),
            b.p.show()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// haproxy in the foreground with a configuration of the test's own, and its stats
/// socket (to see its servers' health).
struct Haproxy {
    p: Logged,
    stats: PathBuf,
}

/// A haproxy configuration: a front end on 127.0.0.1:`front` balancing `servers` with
/// `send` (send-proxy-v2 or send-proxy) and `balance`; `check` is added to the backend
/// (health check rules) and `server` to each server line.
fn haproxy_cfg(stats: &Path, front: u16, servers: &[u16], send: &str, backend: &str) -> String {
    let (rules, server) = backend.split_once('|').unwrap_or((backend, ""));
    let mut c = format!(
        "global\n    stats socket {} level admin\n\
         defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 30s\n    \
         timeout server 30s\n    timeout check 3s\n\
         frontend fe\n    bind 127.0.0.1:{front}\n    default_backend be\n\
         backend be\n{rules}\n",
        stats.display()
    );
    for (i, p) in servers.iter().enumerate() {
        c.push_str(&format!("    server s{i} 127.0.0.1:{p} {send}{server}\n"));
    }
    c
}

impl Haproxy {
    fn start(dir: &Path, cfg: &str, front: u16) -> Haproxy {
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, cfg).expect("write haproxy.cfg");
        let (mut p, _out) = Logged::spawn(
            Command::new("haproxy").arg("-db").arg("-f").arg(&path),
            "haproxy (Debian package haproxy is needed)",
        );
        p.what = format!("haproxy with\n{cfg}");
        util::wait_listening(front, &mut p.child, "haproxy");
        Haproxy {
            p,
            stats: dir.join("stats.sock"),
        }
    }

    /// (server, status, check status) of each server, from `show stat`.
    fn servers(&self) -> Vec<(String, String, String)> {
        let Ok(mut s) = std::os::unix::net::UnixStream::connect(&self.stats) else {
            return Vec::new();
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = s.write_all(b"show stat\n");
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        text.lines()
            .map(|l| l.split(',').collect::<Vec<_>>())
            .filter(|f| {
                f.len() > 36 && !f[0].starts_with('#') && f[1] != "FRONTEND" && f[1] != "BACKEND"
            })
            .map(|f| (f[1].to_string(), f[17].to_string(), f[36].to_string()))
            .collect()
    }

    /// Waits until all `n` servers are UP by a check that passed at layer 7.
    fn wait_checked_up(&self, n: usize) {
        let end = Instant::now() + LIMIT;
        loop {
            let s = self.servers();
            if s.len() == n && s.iter().all(|(_, st, ck)| st == "UP" && ck == "L7OK") {
                return;
            }
            assert!(
                Instant::now() < end,
                "servers not UP by L7 checks: {s:?}{}",
                self.p.show()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Connects from `src` to `port`, sends `msg` and reads it back; returns the
/// connection's own address (the client a balancer's header must name).
fn echo_from(src: &str, port: u16, msg: &[u8]) -> SocketAddr {
    let mut s = util::connect_from(src, port);
    s.set_read_timeout(Some(LIMIT)).expect("timeout");
    s.write_all(msg).expect("send");
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).expect("echo");
    assert_eq!(back, msg);
    s.local_addr().expect("local addr")
}

/// An echo target, for as long as the test runs.
fn echo_target() -> u16 {
    let (l, a) = util::listener();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = s.set_read_timeout(Some(LIMIT));
                let mut b = [0u8; 4096];
                while let Ok(n) = s.read(&mut b) {
                    if n == 0 || s.write_all(&b[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    a.port()
}

/// What a target behind `tcpsplice-dial -p 2` saw of each connection: the source and
/// destination of its v2 header (parsed here, independently of the suite's parser).
type Headers = Arc<Mutex<Vec<(SocketAddr, SocketAddr)>>>;

/// A target that takes the v2 PROXY header of each connection, keeps its addresses,
/// then echoes.
fn v2_target() -> (u16, Headers) {
    let (l, a) = util::listener();
    let seen: Headers = Arc::default();
    let keep = seen.clone();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let keep = keep.clone();
            std::thread::spawn(move || {
                let _ = s.set_read_timeout(Some(LIMIT));
                let mut h = [0u8; 28];
                if s.read_exact(&mut h).is_err() {
                    return;
                }
                let ok = h[..12] == *V2_SIGNATURE && h[12..16] == [0x21, 0x11, 0, 12];
                let addr = |i: usize, p: usize| {
                    let ip = std::net::Ipv4Addr::new(h[i], h[i + 1], h[i + 2], h[i + 3]);
                    SocketAddr::from((ip, u16::from_be_bytes([h[p], h[p + 1]])))
                };
                let zero = SocketAddr::from(([0, 0, 0, 0], 0));
                keep.lock().unwrap().push(if ok {
                    (addr(16, 24), addr(20, 26))
                } else {
                    (zero, zero)
                });
                let mut b = [0u8; 4096];
                while let Ok(n) = s.read(&mut b) {
                    if n == 0 || s.write_all(&b[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    (a.port(), seen)
}

#[test]
fn send_proxy_v2_names_the_real_client_to_both_instances_and_onward() {
    let (tport, seen) = v2_target();
    let t = tport.to_string();
    let prog = [DIAL, "-p", "2", "127.0.0.1", &t, SPLICE];
    let a = listen(&["-P", "127.0.0.1/32"], &prog, &[]);
    let b = listen(&["-P", "127.0.0.1/32"], &prog, &[]);
    let dir = scratch("v2");
    let front = free_port();
    let cfg = haproxy_cfg(
        &dir.join("stats.sock"),
        front,
        &[a.port, b.port],
        "send-proxy-v2",
        "    balance roundrobin",
    );
    let _hp = Haproxy::start(&dir, &cfg, front);
    let clients: Vec<SocketAddr> = ["127.0.0.5", "127.0.0.6", "127.0.0.5", "127.0.0.6"]
        .iter()
        .enumerate()
        .map(|(i, src)| echo_from(src, front, format!("hello {i}").as_bytes()))
        .collect();
    // The relays' end lines (TCPSPLICE_CLIENT, kept by tcpsplice-dial) name the clients.
    let ends = wait_both(&a, &b, "tcpsplice: info: end client=", 4);
    let accepts = wait_both(&a, &b, "tcpsplice-listen: info: accept ", 4);
    for c in &clients {
        let tag = format!("client={c} ");
        assert!(
            ends.iter().any(|l| l.contains(&tag)),
            "no relay end line for {c}: {ends:#?}"
        );
        assert!(
            accepts
                .iter()
                .any(|l| l.contains(&format!("client={c} via=127.0.0.1:"))),
            "no accept line for {c} via the balancer: {accepts:#?}"
        );
    }
    assert!(
        !a.p.lines(" accept ").is_empty() && !b.p.lines(" accept ").is_empty(),
        "round robin used one instance only{}{}",
        a.p.show(),
        b.p.show()
    );
    // The PROXY header tcpsplice-dial -p 2 sent onward: the client, and the address it
    // connected to (haproxy's front end), not the balancer's connection.
    let mut got = seen.lock().unwrap().clone();
    got.sort();
    let mut want: Vec<(SocketAddr, SocketAddr)> = clients
        .iter()
        .map(|&c| (c, SocketAddr::from(([127, 0, 0, 1], front))))
        .collect();
    want.sort();
    assert_eq!(got, want, "headers sent onward");
}

#[test]
fn send_proxy_v1_sets_the_ucspi_variables_the_chain_sees() {
    let prog = ["sh", "-c", SHOW_ENV];
    let a = listen(&["-P", "127.0.0.1"], &prog, &[]);
    let b = listen(&["-P", "127.0.0.1"], &prog, &[]);
    let dir = scratch("v1");
    let front = free_port();
    let cfg = haproxy_cfg(
        &dir.join("stats.sock"),
        front,
        &[a.port, b.port],
        "send-proxy",
        "    balance roundrobin",
    );
    let _hp = Haproxy::start(&dir, &cfg, front);
    for src in ["127.0.0.5", "127.0.0.6", "127.0.0.5", "127.0.0.6"] {
        let s = util::connect_from(src, front);
        s.set_read_timeout(Some(LIMIT)).expect("timeout");
        let me = s.local_addr().expect("local");
        let mut r = BufReader::new(s.try_clone().expect("dup"));
        let mut line = String::new();
        r.read_line(&mut line).expect("env line");
        assert_eq!(
            line,
            format!("{src} {} 127.0.0.1 {front} none\n", me.port()),
            "{}{}",
            a.p.show(),
            b.p.show()
        );
        // What follows the header reaches the program intact.
        (&s).write_all(b"ping\n").expect("ping");
        line.clear();
        r.read_line(&mut line).expect("echo");
        assert_eq!(line, "ping\n");
    }
    wait_both(&a, &b, "via=127.0.0.1:", 4);
}

#[test]
fn per_source_limit_counts_real_clients_and_health_checks_are_the_balancers_own() {
    let target = echo_target();
    let rule = format!("127.0.0.1/32:{target}");
    let prog = [AUTH, "-n", DIAL, "-a", &rule, SPLICE];
    let opts = ["-P", "127.0.0.1/32", "-C", "1"];
    let a = listen(&opts, &prog, &[]);
    let b = listen(&opts, &prog, &[]);
    let dir = scratch("persource");
    let front = free_port();
    // The checks start with a v2 LOCAL header and speak SOCKS5 to the chain.
    let backend =
        "    balance source\n    option tcp-check\n    tcp-check send-binary 050100\n    \
                   tcp-check expect binary 0500| check inter 100ms";
    let cfg = haproxy_cfg(
        &dir.join("stats.sock"),
        front,
        &[a.port, b.port],
        "send-proxy-v2",
        backend,
    );
    let hp = Haproxy::start(&dir, &cfg, front);
    hp.wait_checked_up(2);
    let show = || format!("{}{}{}", a.p.show(), b.p.show(), hp.p.show());

    // All three come from the balancer's address; -C 1 counts the clients behind it.
    let first = util::socks5("127.0.0.5", front, None, target)
        .unwrap_or_else(|e| panic!("{e:?}{}", show()));
    let me = first.local_addr().expect("local");
    assert_eq!(
        util::socks5("127.0.0.5", front, None, target).err(),
        Some(util::Socks5Error::Closed),
        "a second connection of 127.0.0.5 got in{}",
        show()
    );
    let other = util::socks5("127.0.0.6", front, None, target)
        .unwrap_or_else(|e| panic!("{e:?}{}", show()));
    let rejects = wait_both(&a, &b, " reject ", 1);
    assert_eq!(rejects.len(), 1, "{rejects:#?}");
    assert!(
        rejects[0].contains("reject client=127.0.0.5:")
            && rejects[0].contains(" via=127.0.0.1:")
            && rejects[0].contains("per-source limit 1/1"),
        "{rejects:#?}"
    );
    // While both hold their connection, the checks go on, every 100 ms: each is the
    // balancer's own connection (client=127.0.0.1, no via), none is refused by the
    // limit, and the servers stay up.
    let checks = || -> Vec<String> {
        [&a, &b]
            .iter()
            .flat_map(|l| l.p.lines("tcpsplice-listen: info: accept "))
            .filter(|l| l.contains(" client=127.0.0.1:"))
            .collect()
    };
    let before = checks().len();
    std::thread::sleep(Duration::from_millis(1000));
    let checks = checks();
    assert!(
        checks.len() >= before + 4,
        "few checks while clients were held: {checks:#?}"
    );
    assert!(checks.iter().all(|l| !l.contains(" via=")), "{checks:#?}");
    assert_eq!(wait_both(&a, &b, " reject ", 1).len(), 1, "{}", show());
    hp.wait_checked_up(2);

    // The client's slot comes back when its connection ends.
    drop(first);
    let end_of_first = format!("client={me} status=");
    wait_both(&a, &b, &end_of_first, 1);
    let again = util::socks5("127.0.0.5", front, None, target);
    assert!(again.is_ok(), "{again:?}{}", show());
    drop(other);
}

/// A target for `tcpsplice-dial -p 1` in front of an HTTP client: answers with the
/// PROXY line and the request line it received, and counts its connections.
fn http_target() -> (u16, Arc<Mutex<usize>>) {
    let (l, a) = util::listener();
    let count = Arc::new(Mutex::new(0));
    let c = count.clone();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            *c.lock().unwrap() += 1;
            std::thread::spawn(move || {
                let _ = s.set_read_timeout(Some(LIMIT));
                let mut r = BufReader::new(&s);
                let (mut proxy, mut request) = (String::new(), String::new());
                let _ = r.read_line(&mut proxy);
                let _ = r.read_line(&mut request);
                let mut line = String::new();
                while r.read_line(&mut line).is_ok_and(|n| n > 2) {
                    line.clear();
                }
                let body = format!("{}|{}", proxy, request.trim_end());
                let _ = (&s).write_all(
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                );
            });
        }
    });
    (a.port(), count)
}

fn curl(args: &[&str]) -> util::Ran {
    util::run(
        Command::new("curl").args(["-s", "-m", "10"]).args(args),
        LIMIT,
    )
}

#[test]
fn curl_haproxy_protocol_is_a_v1_sender() {
    let (tport, count) = http_target();
    let t = tport.to_string();
    let l = listen(
        &["-P", "127.0.0.5/32"],
        &[DIAL, "-p", "1", "127.0.0.1", &t, SPLICE],
        &[],
    );
    let url = format!("http://127.0.0.1:{}/proxied", l.port);
    let r = curl(&["--haproxy-protocol", "--interface", "127.0.0.5", &url]);
    r.expect_code(0);
    // What reached the target: one PROXY line, tcpsplice-dial's, for curl as the client
    // (its own line was taken off: the next line is the request), then the request.
    let body = String::from_utf8_lossy(&r.stdout).into_owned();
    let (line, request) = body.split_once("\r\n|").expect("two parts");
    assert_eq!(request, "GET /proxied HTTP/1.1", "{body:?}{}", l.p.show());
    let f: Vec<&str> = line.split(' ').collect();
    assert_eq!(
        f[..4],
        ["PROXY", "TCP4", "127.0.0.5", "127.0.0.1"],
        "{body:?}"
    );
    assert_eq!(f[5], l.port.to_string(), "{body:?}");
    l.p.wait_lines(&format!("client=127.0.0.5:{} via=127.0.0.5:", f[4]), 1);

    // Without the header, and from an address not named by -P: dropped, not served.
    let r = curl(&["--interface", "127.0.0.5", &url]);
    assert_ne!(r.status.code(), Some(0), "{}", r.show());
    l.p.wait_lines("drop client=127.0.0.5:", 1);
    let r = curl(&["--haproxy-protocol", "--interface", "127.0.0.1", &url]);
    assert_ne!(r.status.code(), Some(0), "{}", r.show());
    let d = l.p.wait_lines("drop client=127.0.0.1:", 1);
    assert!(d[0].contains("not a trusted balancer"), "{d:?}");
    assert_eq!(*count.lock().unwrap(), 1, "{}", l.p.show());
}

/// A target that counts connections and the bytes they brought.
fn counting_target() -> (u16, Arc<Mutex<Vec<Vec<u8>>>>) {
    let (l, a) = util::listener();
    let got: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let g = got.clone();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let g = g.clone();
            std::thread::spawn(move || {
                let _ = s.set_read_timeout(Some(LIMIT));
                let i = {
                    let mut v = g.lock().unwrap();
                    v.push(Vec::new());
                    v.len() - 1
                };
                let mut b = [0u8; 4096];
                while let Ok(n) = s.read(&mut b) {
                    if n == 0 {
                        break;
                    }
                    g.lock().unwrap()[i].extend_from_slice(&b[..n]);
                }
            });
        }
    });
    (a.port(), got)
}

/// Sends `bytes` from `src`, half-closes if `eof`, and returns how long the connection
/// took to be closed by the other end (EOF or reset), at most 10 s.
fn closed_after(src: &str, port: u16, bytes: &[u8], eof: bool) -> Duration {
    let mut s = util::connect_from(src, port);
    let t = Instant::now();
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    // A reset may come before all is written: that is a close too.
    let _ = s.write_all(bytes);
    if eof {
        let _ = s.shutdown(Shutdown::Write);
    }
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Ok(0) => t.elapsed(),
        Ok(n) => panic!("the dropped connection answered {:?}", &b[..n]),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => panic!("not closed within 10 s"),
        Err(_) => t.elapsed(),
    }
}

fn v2_header(cmd: u8, fam: u8, body: &[u8]) -> Vec<u8> {
    let mut v = V2_SIGNATURE.to_vec();
    v.extend_from_slice(&[0x20 | cmd, fam]);
    v.extend_from_slice(&(body.len() as u16).to_be_bytes());
    v.extend_from_slice(body);
    v
}

#[test]
fn untrusted_missing_truncated_oversize_and_slow_headers_are_dropped_with_nothing_forwarded() {
    let (tport, got) = counting_target();
    let t = tport.to_string();
    let l = listen(
        &["-P", "127.0.0.1/32", "-t", "1"],
        &[DIAL, "127.0.0.1", &t, SPLICE],
        &[],
    );
    let valid = b"PROXY TCP4 192.0.2.9 127.0.0.1 4242 443\r\ndata".to_vec();
    let oversize_v1 = [b"PROXY TCP4 ".as_slice(), &[b'1'; 120]].concat();
    let mut oversize_v2 = v2_header(1, 0x11, &[]);
    oversize_v2[14..16].copy_from_slice(&4096u16.to_be_bytes());
    let fast = Duration::from_millis(700);
    for (i, (name, src, bytes, eof, why)) in [
        (
            "untrusted",
            "127.0.0.7",
            valid.clone(),
            false,
            "not a trusted balancer",
        ),
        (
            "missing",
            "127.0.0.1",
            b"GET / HTTP/1.0\r\n\r\n".to_vec(),
            false,
            "no PROXY header",
        ),
        (
            "socks",
            "127.0.0.1",
            vec![5, 1, 0],
            false,
            "no PROXY header",
        ),
        (
            "truncated",
            "127.0.0.1",
            valid[..20].to_vec(),
            true,
            "closed after 20 bytes",
        ),
        (
            "oversize v1",
            "127.0.0.1",
            oversize_v1,
            false,
            "longer than 107",
        ),
        (
            "oversize v2",
            "127.0.0.1",
            oversize_v2,
            false,
            "longer than",
        ),
        (
            "udp",
            "127.0.0.1",
            v2_header(1, 0x12, &[1; 12]),
            false,
            "other than TCP",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let took = closed_after(src, l.port, &bytes, eof);
        assert!(took < fast, "{name}: closed after {took:?}{}", l.p.show());
        // One drop line per case, in their order.
        let d = l.p.wait_lines(" drop client=", i + 1);
        assert!(
            d[i].contains(&format!("drop client={src}:")) && d[i].contains(why),
            "{name}: {d:#?}"
        );
    }
    // Slow or silent: dropped at the deadline (-t 1), not before, not much after.
    for (name, bytes) in [("slow", &valid[..25]), ("silent", &b""[..])] {
        let took = closed_after("127.0.0.1", l.port, bytes, false);
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(3),
            "{name}: closed after {took:?}{}",
            l.p.show()
        );
    }
    l.p.wait_lines("no whole PROXY header within 1s", 2);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        got.lock().unwrap().len(),
        0,
        "a dropped connection reached the target{}",
        l.p.show()
    );

    // The controls: a v2 header with the client's bytes right behind it in one write,
    // and a v1 header sent a few bytes at a time, are served, and the target gets
    // exactly what followed the header.
    let mut s = util::connect_from("127.0.0.1", l.port);
    let h = v2_header(1, 0x11, &[192, 0, 2, 9, 127, 0, 0, 1, 0x10, 0x92, 1, 187]);
    s.write_all(&[h.as_slice(), b"\r\n\r\n\0payload"].concat())
        .expect("write");
    drop(s);
    let mut s = util::connect_from("127.0.0.1", l.port);
    for chunk in valid.chunks(7) {
        s.write_all(chunk).expect("write");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(s);
    l.p.wait_lines("tcpsplice: info: end ", 2);
    let mut seen = got.lock().unwrap().clone();
    seen.sort();
    assert_eq!(
        seen,
        [b"\r\n\r\n\0payload".to_vec(), b"data".to_vec()],
        "{}",
        l.p.show()
    );
    l.p.wait_lines("client=192.0.2.9:4242 via=127.0.0.1:", 2);
}

/// Reads the first line the chain sends, or None when the connection is closed first.
fn first_line(s: &TcpStream) -> Option<String> {
    s.set_read_timeout(Some(LIMIT)).expect("timeout");
    let mut line = String::new();
    match BufReader::new(s).read_line(&mut line) {
        Ok(n) if n > 0 => Some(line),
        _ => None,
    }
}

/// Sends `bytes` from `src` to `port`, returns the chain's first line.
fn show_env(src: &str, port: u16, bytes: &[u8]) -> (Option<String>, SocketAddr) {
    let mut s = util::connect_from(src, port);
    s.write_all(bytes).expect("write");
    (first_line(&s), s.local_addr().expect("local"))
}

/// A supervisor running the chain per connection on 127.0.0.1:`port`, once listening.
fn supervised(cmd: &mut Command, what: &str, port: u16) -> Logged {
    let (mut sup, _out) = Logged::spawn(cmd, what);
    util::wait_listening(port, &mut sup.child, what);
    sup
}

/// A v1 header to `port` from the balancer: the chain sees the client it names, and
/// nothing that described the balancer's connection.
fn names_the_client(port: u16, sup: &Logged) {
    let (line, _) = show_env(
        "127.0.0.1",
        port,
        b"PROXY TCP4 192.0.2.9 198.51.100.1 4242 443\r\n",
    );
    assert_eq!(
        line.as_deref(),
        Some("192.0.2.9 4242 198.51.100.1 443 none\n"),
        "{}",
        sup.show()
    );
}

#[test]
fn tcpsplice_proxy_is_a_link_for_tcpserver_and_systemd_socket_activation() {
    // Under tcpserver: TCP* set by it for the balancer's connection, then rewritten.
    let port = free_port();
    let sup = supervised(
        Command::new("tcpserver")
            .args(["-R", "-l0", "127.0.0.1", &port.to_string()])
            .args([PROXY, "-a", "127.0.0.1/32", "-t", "1", "sh", "-c", SHOW_ENV])
            .env("TCPSPLICE_LOG", "stderr"),
        "tcpserver (Debian package ucspi-tcp)",
        port,
    );
    // TCPLOCALHOST=0 (tcpserver -l0) described the balancer's connection: gone.
    names_the_client(port, &sup);
    let mut six = Vec::new();
    six.extend_from_slice(
        &"2001:db8::9"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
    );
    six.extend_from_slice(
        &"2001:db8::1"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
    );
    six.extend_from_slice(&[0x10, 0xe7, 1, 187]);
    let (line, _) = show_env("127.0.0.1", port, &v2_header(1, 0x21, &six));
    assert_eq!(
        line.as_deref(),
        Some("2001:db8::9 4327 2001:db8::1 443 none\n")
    );
    // LOCAL: the balancer's own connection, as tcpserver described it.
    let (line, me) = show_env("127.0.0.1", port, &v2_header(0, 0, &[]));
    assert_eq!(
        line,
        Some(format!("127.0.0.1 {} 127.0.0.1 {port} 0\n", me.port()))
    );
    // Dropped: an address not named by -a, no header, a slow one.
    assert_eq!(
        show_env(
            "127.0.0.7",
            port,
            b"PROXY TCP4 192.0.2.9 198.51.100.1 4242 443\r\n"
        )
        .0,
        None
    );
    assert_eq!(show_env("127.0.0.1", port, b"hello\n").0, None);
    let t = Instant::now();
    assert_eq!(show_env("127.0.0.1", port, b"PROXY TCP4 ").0, None);
    assert!(
        t.elapsed() >= Duration::from_millis(900) && t.elapsed() < Duration::from_secs(3),
        "{:?}",
        t.elapsed()
    );
    sup.wait_lines("tcpsplice-proxy: warning: drop client=127.0.0.7:", 1);
    sup.wait_lines("proxy header: no PROXY header", 1);
    sup.wait_lines("no whole PROXY header within 1s (11 bytes came)", 1);

    // Under systemd-socket-activate --inetd: no TCP* at all; the balancer is the
    // socket's peer, and a LOCAL connection is described from the socket.
    let port = free_port();
    let sup = supervised(
        Command::new("systemd-socket-activate")
            .args(["--inetd", "-a", "-l", &format!("127.0.0.1:{port}")])
            .args(["-E", "TCPSPLICE_LOG=stderr"])
            .args([PROXY, "-a", "127.0.0.1", "sh", "-c", SHOW_ENV]),
        "systemd-socket-activate",
        port,
    );
    names_the_client(port, &sup);
    let (line, me) = show_env("127.0.0.1", port, b"PROXY UNKNOWN\r\n");
    assert_eq!(
        line,
        Some(format!("127.0.0.1 {} 127.0.0.1 {port} none\n", me.port()))
    );
    assert_eq!(
        show_env("127.0.0.6", port, b"PROXY UNKNOWN\r\n").0,
        None,
        "{}",
        sup.show()
    );
}

fn sha512(pw: &str) -> String {
    util::mkpasswd("sha-512", pw)
}

/// An HTTP CONNECT with a login from `src`; the status line of the answer.
fn http_connect(port: u16, user: &str, pw: &str, target: u16) -> String {
    let mut s = util::connect_from("127.0.0.1", port);
    let t = format!("127.0.0.1:{target}");
    s.write_all(
        format!(
            "CONNECT {t} HTTP/1.1\r\nHost: {t}\r\nProxy-Authorization: Basic {}\r\n\r\n",
            util::basic(user, pw)
        )
        .as_bytes(),
    )
    .expect("request");
    first_line(&s).unwrap_or_default()
}

/// The pid of the connection process that serves the client `me`, from its accept line.
fn pid_of(l: &Listen, me: SocketAddr) -> i32 {
    let line = l.p.wait_lines(&format!(" client={me} "), 1).remove(0);
    line.split(' ')
        .find_map(|w| w.strip_prefix("pid="))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {line}"))
}

#[test]
fn a_user_over_the_cap_is_refused_while_others_get_in_and_freed_places_are_reused() {
    let target = echo_target();
    let dir = scratch("peruser");
    let users = dir.join("users");
    std::fs::write(
        &users,
        format!(
            "alice:{h}:conns=2, 127.0.0.1/32\nbob:{h}\ncarol:{h}:conns=0\n",
            h = sha512("pw")
        ),
    )
    .expect("users");
    let rule = format!("127.0.0.1/32:{target}");
    let f = users.to_string_lossy().into_owned();
    // -l 1 for everyone but alice (2) and carol (no cap).
    let l = listen(
        &["-C", "0"],
        &[
            AUTH, "-l", "1", "-d", "0", "-f", &f, DIAL, "-a", &rule, SPLICE,
        ],
        &[],
    );
    let open = |u: &str| util::socks5("127.0.0.1", l.port, Some((u, "pw")), target);
    let a1 = open("alice").unwrap_or_else(|e| panic!("{e:?}{}", l.p.show()));
    let a2 = open("alice").unwrap_or_else(|e| panic!("{e:?}{}", l.p.show()));
    assert_eq!(
        open("alice").err(),
        Some(util::Socks5Error::Rep(2)),
        "{}",
        l.p.show()
    );
    assert!(
        http_connect(l.port, "alice", "pw", target).starts_with("HTTP/1.1 429 "),
        "{}",
        l.p.show()
    );
    let r = l.p.wait_lines("reject client=", 2);
    assert!(
        r[0].contains(" user=alice proto=socks5 per-user limit 2/2")
            && r[1].contains(" user=alice proto=http per-user limit 2/2"),
        "{r:#?}"
    );
    // Another user still gets in; bob has -l's 1, carol none.
    let b1 = open("bob").unwrap_or_else(|e| panic!("{e:?}{}", l.p.show()));
    assert_eq!(open("bob").err(), Some(util::Socks5Error::Rep(2)));
    let carols: Vec<TcpStream> = (0..3)
        .map(|_| open("carol").unwrap_or_else(|e| panic!("{e:?}{}", l.p.show())))
        .collect();
    // The relay still sees only the target rules in TCPSPLICE_RULES: alice's rule let
    // her reach the target, and no conns= word broke it.
    let a1_addr = a1.local_addr().expect("local");
    let a2_addr = a2.local_addr().expect("local");
    let a2_pid = pid_of(&l, a2_addr);

    // alice's first connection ends: its process is reused (same pid) for carol, so
    // alice's next one goes to a new process, which must not find her place taken.
    let a1_pid = pid_of(&l, a1_addr);
    drop(a1);
    l.p.wait_lines(&format!("client={a1_addr} status=0"), 1);
    let c4 = open("carol").unwrap_or_else(|e| panic!("{e:?}{}", l.p.show()));
    assert_eq!(
        pid_of(&l, c4.local_addr().expect("local")),
        a1_pid,
        "carol's connection did not reuse the process{}",
        l.p.show()
    );
    let a3 = open("alice").unwrap_or_else(|e| panic!("alice again: {e:?}{}", l.p.show()));
    assert_eq!(open("alice").err(), Some(util::Socks5Error::Rep(2)));

    // A process killed in the middle of alice's connection gives her place back when
    // the listener reaps it.
    // SAFETY: kill with the pid of the listener's connection process.
    assert_eq!(unsafe { libc::kill(a2_pid, libc::SIGKILL) }, 0);
    l.p.wait_lines(&format!("end pid={a2_pid} client={a2_addr} signal=9"), 1);
    let a4 = open("alice").unwrap_or_else(|e| panic!("after the kill: {e:?}{}", l.p.show()));
    assert_eq!(open("alice").err(), Some(util::Socks5Error::Rep(2)));
    drop((a3, a4, b1, c4, carols));
}

#[test]
fn per_user_limits_are_warned_about_where_they_cannot_apply() {
    let dir = scratch("nolimits");
    let users = dir.join("users");
    std::fs::write(&users, format!("alice:{}:conns=2\n", sha512("pw"))).expect("users");
    let f = users.to_string_lossy().into_owned();
    let warning = "per-user connection limits (-l, conns=) are not enforced";
    // Exec'd, as under inetd: no memory shared with other connections.
    for opts in [&["-f", &f][..], &["-l", "3", "-n"][..]] {
        let (c, s) = util::tcp_pair();
        // The client has gone: the authenticator starts, warns, and ends at once.
        c.shutdown(Shutdown::Both).expect("shutdown");
        let r = util::run(
            Command::new(AUTH)
                .args(opts)
                .arg("true")
                .env("TCPSPLICE_LOG", "stderr")
                .stdin(Stdio::from(std::os::fd::OwnedFd::from(
                    s.try_clone().expect("dup"),
                )))
                .stdout(Stdio::from(std::os::fd::OwnedFd::from(s))),
            LIMIT,
        );
        assert!(r.stderr_text().contains(warning), "{opts:?}{}", r.show());
    }
    // Under tcpsplice-listen without the in-process chain: the same.
    let l = listen(
        &[],
        &[AUTH, "-f", &f, "true"],
        &[("TCPSPLICE_EXEC", "always")],
    );
    let s = TcpStream::connect(("127.0.0.1", l.port)).expect("connect");
    l.p.wait_lines(warning, 1);
    drop(s);
    // And not where they apply.
    let l = listen(&[], &[AUTH, "-f", &f, "true"], &[]);
    let s = TcpStream::connect(("127.0.0.1", l.port)).expect("connect");
    l.p.wait_lines(" accept ", 1);
    drop(s);
    l.p.wait_lines(" end ", 1);
    assert!(l.p.lines(warning).is_empty(), "{}", l.p.show());
}

#[test]
fn the_shipped_haproxy_example_balances_two_instances_with_checks() {
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/haproxy.cfg"))
            .expect("examples/haproxy.cfg");
    let r = util::run(
        Command::new("haproxy").args([
            "-c",
            "-f",
            concat!(env!("CARGO_MANIFEST_DIR"), "/examples/haproxy.cfg"),
        ]),
        LIMIT,
    );
    r.expect_code(0);
    let target = echo_target();
    let dir = scratch("example");
    let users = dir.join("users");
    std::fs::write(&users, format!("alice:{}\n", sha512("pw"))).expect("users");
    let f = users.to_string_lossy().into_owned();
    let rule = format!("127.0.0.1/32:{target}");
    // As the example's comment runs them, with loopback for the hosts' addresses.
    let prog = [AUTH, "-f", &f, "-l", "50", DIAL, "-a", &rule, SPLICE];
    let a = listen(&["-P", "127.0.0.1/32", "-C", "20"], &prog, &[]);
    let b = listen(&["-P", "127.0.0.1/32", "-C", "20"], &prog, &[]);
    let front = free_port();
    let stats = dir.join("stats.sock");
    let mut cfg = example.clone();
    for (from, to) in [
        (
            "global\n",
            format!("global\n    stats socket {} level admin\n", stats.display()),
        ),
        ("bind :1080", format!("bind 127.0.0.1:{front}")),
        ("10.0.0.11:1080", format!("127.0.0.1:{}", a.port)),
        ("10.0.0.12:1080", format!("127.0.0.1:{}", b.port)),
    ] {
        assert!(cfg.contains(from), "the example has no {from:?}");
        cfg = cfg.replacen(from, &to, 1);
    }
    let hp = Haproxy::start(&dir, &cfg, front);
    hp.wait_checked_up(2);
    let mut held = Vec::new();
    for src in ["127.0.0.5", "127.0.0.6", "127.0.0.5", "127.0.0.6"] {
        let s = util::socks5(src, front, Some(("alice", "pw")), target)
            .unwrap_or_else(|e| panic!("{e:?}{}{}{}", a.p.show(), b.p.show(), hp.p.show()));
        held.push(s);
    }
    // leastconn with all four held: two on each instance, each named by its client.
    let accepts = wait_both(&a, &b, " via=127.0.0.1:", 4);
    for s in &held {
        let me = s.local_addr().expect("local");
        assert!(
            accepts
                .iter()
                .any(|l| l.contains(&format!("client={me} via="))),
            "{me}: {accepts:#?}"
        );
    }
    assert_eq!(a.p.lines(" via=127.0.0.1:").len(), 2, "{}", a.p.show());
    assert_eq!(b.p.lines(" via=127.0.0.1:").len(), 2, "{}", b.p.show());
}

#[test]
fn the_proxy_man_page_documents_every_option() {
    let r = util::run(Command::new(PROXY).arg("-h"), LIMIT);
    r.expect_code(0);
    let man = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/man/tcpsplice-proxy.1"
    ))
    .expect("man page");
    for opt in [".BI \\-a ", ".BI \\-t ", ".B \\-h\n"] {
        assert!(man.contains(opt), "no {opt:?} entry");
    }
    // (Its sections, mandoc -Tlint and the usage: tests/integration/docs.rs.)
    // Without -a it refuses to start: no header is believed by default.
    util::run(Command::new(PROXY).arg("true"), LIMIT).expect_code(100);
}
