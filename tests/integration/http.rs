//! Plain-HTTP forwarding (absolute-form requests) through the whole chain under
//! tcpsplice-listen, against origins on loopback that record every byte they receive.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::util::{self, Ran};

const LISTEN: &str = env!("CARGO_BIN_EXE_tcpsplice-listen");
const AUTH: &str = env!("CARGO_BIN_EXE_tcpsplice-auth");
const DIAL: &str = env!("CARGO_BIN_EXE_tcpsplice-dial");
const SPLICE: &str = env!("CARGO_BIN_EXE_tcpsplice");
const LIMIT: Duration = Duration::from_secs(30);
const USER: &str = "alice";
const PW: &str = "s3cret-pw";

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tcpsplice-http-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

/// A users file with alice, hashed by `tcpsplice-auth -H`.
fn users(dir: &std::path::Path) -> PathBuf {
    let hash = util::tool(AUTH, &["-H"], PW);
    let p = dir.join("users");
    std::fs::write(&p, format!("{USER}:{hash}\n")).expect("write users");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).expect("chmod users");
    p
}

// ---------------------------------------------------------------- the origin

/// What one connection to the origin brought.
#[derive(Default, Clone)]
struct Seen {
    bytes: Vec<u8>,
}

/// An HTTP/1.1 origin on loopback. Per connection: reads one request (head, then a
/// Content-Length or chunked body), answers it, shuts down its sending side, and keeps
/// reading (recording) until the peer closes, so that every byte a proxy ever sent is
/// in `seen`. Paths: `/pattern/N` (N pattern bytes), `/slow` (never answers), anything
/// else a short text; a body is answered with its length and hash.
#[derive(Clone)]
struct Origin {
    port: u16,
    seen: Arc<Mutex<Vec<Arc<Mutex<Seen>>>>>,
    /// Connections whose peer has closed.
    closed: Arc<Mutex<usize>>,
    /// Serves GET and HEAD of `/PATH` from this directory when set.
    root: Option<Arc<PathBuf>>,
}

impl Origin {
    fn start() -> Origin {
        Origin::serving(None)
    }

    fn files(root: &std::path::Path) -> Origin {
        Origin::serving(Some(root.to_path_buf()))
    }

    fn serving(root: Option<PathBuf>) -> Origin {
        let (l, a) = util::listener();
        let o = Origin {
            port: a.port(),
            seen: Arc::new(Mutex::new(Vec::new())),
            closed: Arc::new(Mutex::new(0)),
            root: root.map(Arc::new),
        };
        let o2 = o.clone();
        std::thread::spawn(move || accept_loop(l, o2));
        o
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn connections(&self) -> Vec<Vec<u8>> {
        self.seen
            .lock()
            .expect("lock")
            .iter()
            .map(|s| s.lock().expect("lock").bytes.clone())
            .collect()
    }

    /// Waits until `n` connections came and every one of them was closed by the peer
    /// (recording ends at its end of file), then returns what they brought.
    fn wait_connections(&self, n: usize) -> Vec<Vec<u8>> {
        let end = Instant::now() + LIMIT;
        loop {
            let done = self.seen.lock().expect("lock").len() >= n
                && self.closed.lock().map(|c| *c >= n).unwrap_or(false);
            if done || Instant::now() > end {
                return self.connections();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn accept_loop(l: TcpListener, o: Origin) {
    for s in l.incoming().flatten() {
        let seen = Arc::new(Mutex::new(Seen::default()));
        o.seen.lock().expect("lock").push(seen.clone());
        let closed = o.closed.clone();
        let root = o.root.clone();
        std::thread::spawn(move || {
            serve(s, &seen, root.as_deref());
            *closed.lock().expect("lock") += 1;
        });
    }
}

/// Reads from `s` into the record and `buf` until `done(buf)` says how much is wanted.
fn fill(s: &mut TcpStream, seen: &Mutex<Seen>, buf: &mut Vec<u8>, want: usize) -> bool {
    let mut b = vec![0u8; 256 * 1024];
    while buf.len() < want {
        match s.read(&mut b) {
            Ok(0) | Err(_) => return false,
            Ok(n) => {
                buf.extend_from_slice(&b[..n]);
                seen.lock().expect("lock").bytes.extend_from_slice(&b[..n]);
            }
        }
    }
    true
}

/// Reads once more into `buf`; false at end of file.
fn more(s: &mut TcpStream, seen: &Mutex<Seen>, buf: &mut Vec<u8>) -> bool {
    let want = buf.len() + 1;
    fill(s, seen, buf, want)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A file under `root` for a request path: (status line, content type, content).
fn file_response(root: &std::path::Path, path: &str) -> (&'static str, &'static str, Vec<u8>) {
    let path = path.split('?').next().unwrap_or("");
    let mut p = root.to_path_buf();
    for part in path.split('/').filter(|s| !s.is_empty()) {
        if part == ".." {
            return ("404 Not Found", "text/plain", b"no\n".to_vec());
        }
        p.push(part);
    }
    if p.is_dir() {
        p.push("index.html");
    }
    let kind = if p.extension().is_some_and(|e| e == "html") {
        "text/html"
    } else {
        "application/octet-stream"
    };
    match std::fs::read(&p) {
        Ok(data) => ("200 OK", kind, data),
        Err(_) => ("404 Not Found", "text/plain", b"no\n".to_vec()),
    }
}

fn serve(mut s: TcpStream, seen: &Mutex<Seen>, root: Option<&PathBuf>) {
    let _ = s.set_read_timeout(Some(LIMIT));
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i + 4;
        }
        if !more(&mut s, seen, &mut buf) {
            return;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let lower = head.to_ascii_lowercase();
    let path = head.split(' ').nth(1).unwrap_or("").to_string();
    if path == "/drip" {
        // A close-delimited response in two parts, 1.5 s apart.
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\n\r\n");
        let _ = s.write_all(&[b'a'; 1000]);
        std::thread::sleep(Duration::from_millis(1500));
        let _ = s.write_all(&[b'b'; 1000]);
        return;
    }
    if path == "/cut" {
        // A close-delimited response cut short by a reset.
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n");
        let _ = s.write_all(&util::pattern(9, 100_000));
        std::thread::sleep(Duration::from_millis(200));
        crate::splice::reset(s);
        return;
    }
    if path == "/reject" {
        // Refuses an upload without reading it, once the proxy is stuck writing to it
        // (its pipe full of the client's bytes), and holds the connection a while.
        std::thread::sleep(Duration::from_millis(500));
        let _ = s.write_all(
            b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 4\r\nConnection: close\r\n\r\n",
        );
        // The body comes on its own, through the relay's pipe.
        std::thread::sleep(Duration::from_millis(300));
        let _ = s.write_all(b"big\n");
        std::thread::sleep(Duration::from_secs(6));
        return;
    }
    let mut body = Vec::new();
    let mut rest = buf.split_off(head_end);
    if let Some(cl) = lower
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        if !fill(&mut s, seen, &mut rest, cl) {
            return;
        }
        body = rest[..cl].to_vec();
    } else if lower.contains("\r\ntransfer-encoding: chunked\r\n") {
        let mut pos = 0;
        loop {
            let line_end = loop {
                if let Some(i) = find(&rest[pos..], b"\r\n") {
                    break pos + i;
                }
                if !more(&mut s, seen, &mut rest) {
                    return;
                }
            };
            let size_text = String::from_utf8_lossy(&rest[pos..line_end]).to_string();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .unwrap_or(0);
            pos = line_end + 2;
            if size == 0 {
                // Trailers up to the empty line.
                loop {
                    let end = loop {
                        if let Some(i) = find(&rest[pos..], b"\r\n") {
                            break pos + i;
                        }
                        if !more(&mut s, seen, &mut rest) {
                            return;
                        }
                    };
                    let empty = end == pos;
                    pos = end + 2;
                    if empty {
                        break;
                    }
                }
                break;
            }
            if !fill(&mut s, seen, &mut rest, pos + size + 2) {
                return;
            }
            body.extend_from_slice(&rest[pos..pos + size]);
            pos += size + 2;
        }
    }
    let method = head.split(' ').next().unwrap_or("");
    if path == "/slow" {
        std::thread::sleep(Duration::from_secs(5));
        return;
    }
    let mut status = "200 OK";
    let mut kind = "text/plain";
    let (extra, payload) = if let Some(root) = root {
        let (st, k, data) = file_response(root, &path);
        (status, kind) = (st, k);
        (String::new(), data)
    } else if method == "POST" || method == "PUT" {
        let (h, n) = util::hash_of(&body);
        (String::new(), format!("got {n} {h:x}\n").into_bytes())
    } else if let Some(n) = path.strip_prefix("/pattern/") {
        let n: usize = n.parse().unwrap_or(0);
        (String::new(), util::pattern(7, n))
    } else {
        (
            "Keep-Alive: timeout=5\r\nConnection: keep-alive\r\n".to_string(),
            format!("hello {path}\n").into_bytes(),
        )
    };
    let resp_head = format!(
        "HTTP/1.1 {status}\r\n{extra}Content-Type: {kind}\r\nContent-Length: {}\r\n\r\n",
        payload.len()
    );
    let _ = s.write_all(resp_head.as_bytes());
    if method != "HEAD" {
        let _ = s.write_all(&payload);
    }
    let _ = s.shutdown(std::net::Shutdown::Write);
    // Keep recording whatever else comes, until the proxy closes.
    let mut more = Vec::new();
    fill(&mut s, seen, &mut more, usize::MAX);
}

// ---------------------------------------------------------------- the proxy

/// tcpsplice-listen running auth, dial and splice on an ephemeral port.
struct Proxy {
    child: Option<std::process::Child>,
    port: u16,
    log: Arc<Mutex<Vec<u8>>>,
}

impl Proxy {
    fn start(users: &std::path::Path, dial: &[&str], splice: &[&str]) -> Proxy {
        let mut cmd = Command::new(LISTEN);
        cmd.args(["-1", "127.0.0.1", "0", AUTH, "-d", "0.2", "-f"])
            .arg(users)
            .arg(DIAL)
            .args(dial)
            .arg(SPLICE)
            .args(splice)
            .env("TCPSPLICE_LOG", "stderr")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn tcpsplice-listen");
        let mut err = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let l2 = log.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                l2.lock().expect("lock").extend_from_slice(&buf[..n]);
            }
        });
        let mut out = child.stdout.take().expect("stdout");
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while out.read(&mut b).unwrap_or(0) == 1 && b[0] != b'\n' {
            line.push(b[0]);
        }
        let Ok(port) = String::from_utf8_lossy(&line).trim().parse() else {
            let _ = child.kill();
            panic!("tcpsplice-listen printed no port: {line:?}");
        };
        Proxy {
            child: Some(child),
            port,
            log,
        }
    }

    /// The usual chain: loopback targets allowed.
    fn loopback(users: &std::path::Path) -> Proxy {
        Proxy::start(users, &["-a", "127.0.0.0/8"], &[])
    }

    fn log(&self) -> String {
        String::from_utf8_lossy(&self.log.lock().expect("lock")).into_owned()
    }

    /// Connects and sends a GET for `url` with the credentials.
    fn send_get(&self, url: &str) -> TcpStream {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("connect proxy");
        s.set_read_timeout(Some(LIMIT)).expect("timeout");
        let req = format!(
            "GET {url} HTTP/1.1\r\nProxy-Authorization: {}\r\n\r\n",
            basic()
        );
        s.write_all(req.as_bytes()).expect("send");
        s
    }

    fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: kill takes a pid and a signal number.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }

    /// Waits for `needle` in the log, `times` times.
    fn wait_log(&self, needle: &str, times: usize) -> String {
        let end = Instant::now() + LIMIT;
        loop {
            let log = self.log();
            if log.matches(needle).count() >= times || Instant::now() > end {
                return log;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn url(&self, creds: bool) -> String {
        if creds {
            format!("http://{USER}:{PW}@127.0.0.1:{}", self.port)
        } else {
            format!("http://127.0.0.1:{}", self.port)
        }
    }

    /// One raw exchange: sends `req` in one write, reads the answer to end of file.
    fn raw(&self, req: &[u8]) -> Vec<u8> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("connect proxy");
        s.set_read_timeout(Some(LIMIT)).expect("timeout");
        s.write_all(req).expect("send request");
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        got
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn basic() -> String {
    format!(
        "Basic {}",
        util::tool("base64", &["-w0"], &format!("{USER}:{PW}"))
    )
}

fn run(cmd: &str, args: &[String], env: &[(&str, String)]) -> Ran {
    let mut c = Command::new(cmd);
    c.args(args).stdin(Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    c.env_remove("https_proxy").env_remove("no_proxy");
    util::run(&mut c, LIMIT)
}

fn curl(proxy: &Proxy, args: &[&str]) -> Ran {
    let mut a: Vec<String> = vec![
        "-sS".into(),
        "--max-time".into(),
        "20".into(),
        "-x".into(),
        proxy.url(true),
    ];
    a.extend(args.iter().map(|s| s.to_string()));
    run("curl", &a, &[])
}

fn status_of(resp: &[u8]) -> String {
    String::from_utf8_lossy(resp)
        .split("\r\n")
        .next()
        .unwrap_or("")
        .to_string()
}

fn head_text(resp: &[u8]) -> String {
    let end = find(resp, b"\r\n\r\n").map_or(resp.len(), |i| i + 4);
    String::from_utf8_lossy(&resp[..end]).to_string()
}

/// The head the origin received on one connection.
fn origin_head(conn: &[u8]) -> String {
    head_text(conn)
}

// ---------------------------------------------------------------- the tests

#[test]
fn curl_get_and_head_are_rewritten_both_ways() {
    let dir = scratch("get");
    let proxy = Proxy::loopback(&users(&dir));
    let origin = Origin::start();
    let r = curl(&proxy, &["-D", "-", &origin.url("/a/b?c=d")]);
    r.expect_code(0);
    let out = String::from_utf8_lossy(&r.stdout).to_string();
    assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{}", r.show());
    assert!(out.contains("\r\nConnection: close\r\n"), "{}", r.show());
    assert!(
        !out.to_ascii_lowercase().contains("keep-alive"),
        "{}",
        r.show()
    );
    assert!(out.ends_with("\r\n\r\nhello /a/b?c=d\n"), "{}", r.show());
    let conns = origin.wait_connections(1);
    assert_eq!(conns.len(), 1);
    let h = origin_head(&conns[0]);
    assert!(
        h.starts_with(&format!(
            "GET /a/b?c=d HTTP/1.1\r\nHost: 127.0.0.1:{}\r\n",
            origin.port
        )),
        "{h}"
    );
    assert!(h.ends_with("\r\nConnection: close\r\n\r\n"), "{h}");
    let lower = h.to_ascii_lowercase();
    assert!(!lower.contains("proxy-"), "{h}");
    assert_eq!(conns[0].len(), h.len(), "the origin got more than the head");
    let log = proxy.wait_log(" how=", 1);
    assert!(
        log.contains(&format!(
            "user={USER} target=127.0.0.1:{} up=0 down=",
            origin.port
        )),
        "{log}"
    );

    let r = curl(&proxy, &["-I", &origin.url("/h")]);
    r.expect_code(0);
    let out = String::from_utf8_lossy(&r.stdout).to_string();
    assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{}", r.show());
    assert!(out.contains("Content-Length: 9\r\n"), "{}", r.show());
    let conns = origin.wait_connections(2);
    assert!(origin_head(&conns[1]).starts_with("HEAD /h HTTP/1.1\r\n"));

    // A large response moves intact.
    let big = 8 << 20;
    let r = curl(&proxy, &[&origin.url(&format!("/pattern/{big}"))]);
    r.expect_code(0);
    assert_eq!(r.stdout.len(), big, "{}", r.show());
    assert_eq!(
        util::hash_of(&r.stdout),
        util::hash_of(&util::pattern(7, big))
    );
}

#[test]
fn curl_posts_a_10_mib_body_and_a_chunked_body_exactly() {
    let dir = scratch("post");
    let proxy = Proxy::loopback(&users(&dir));
    let origin = Origin::start();
    let data = util::pattern(11, 10 << 20);
    let file = dir.join("body");
    std::fs::write(&file, &data).expect("write body");
    let (h, n) = util::hash_of(&data);
    let want = format!("got {n} {h:x}\n");
    let at = format!("@{}", file.display());
    let r = curl(&proxy, &["--data-binary", &at, &origin.url("/up")]);
    r.expect_code(0);
    assert_eq!(String::from_utf8_lossy(&r.stdout), want, "{}", r.show());
    let r = curl(
        &proxy,
        &[
            "-H",
            "Transfer-Encoding: chunked",
            "--data-binary",
            &at,
            &origin.url("/chunked"),
        ],
    );
    r.expect_code(0);
    assert_eq!(String::from_utf8_lossy(&r.stdout), want, "{}", r.show());
    let conns = origin.wait_connections(2);
    assert_eq!(conns.len(), 2);
    // Exactly the head and the body, nothing after.
    let h0 = origin_head(&conns[0]);
    assert!(h0.contains(&format!("\r\nContent-Length: {n}\r\n")), "{h0}");
    assert!(!h0.to_ascii_lowercase().contains("expect:"), "{h0}");
    assert_eq!(conns[0].len() as u64, h0.len() as u64 + n);
    let h1 = origin_head(&conns[1]);
    assert!(h1.contains("\r\nTransfer-Encoding: chunked\r\n"), "{h1}");
    assert!(conns[1].ends_with(b"\r\n0\r\n\r\n"), "chunked body end");
    let body = &conns[1][h1.len()..];
    assert_eq!(tcpsplice::http::scan_chunked(body), Ok(Some(body.len())));
}

#[test]
fn wget_with_http_proxy_and_proxy_credentials() {
    let dir = scratch("wget");
    let proxy = Proxy::loopback(&users(&dir));
    let origin = Origin::start();
    let n = 3 << 20;
    let out = dir.join("got");
    let r = run(
        "wget",
        &[
            "-q".into(),
            "-T".into(),
            "20".into(),
            "-t".into(),
            "1".into(),
            "--proxy-user".into(),
            USER.into(),
            "--proxy-password".into(),
            PW.into(),
            "-O".into(),
            out.display().to_string(),
            origin.url(&format!("/pattern/{n}")),
        ],
        &[("http_proxy", proxy.url(false))],
    );
    r.expect_code(0);
    let got = std::fs::read(&out).expect("wget output");
    assert_eq!(util::hash_of(&got), util::hash_of(&util::pattern(7, n)));
    let conns = origin.wait_connections(1);
    let h = origin_head(&conns[0]);
    assert!(
        h.starts_with(&format!("GET /pattern/{n} HTTP/1.1\r\n")),
        "{h}"
    );
    assert!(!h.to_ascii_lowercase().contains("proxy-"), "{h}");
}

#[test]
fn pipelined_requests_never_reach_an_origin() {
    let dir = scratch("pipeline");
    let proxy = Proxy::loopback(&users(&dir));
    let (o1, o2) = (Origin::start(), Origin::start());
    let auth = basic();
    let req = format!(
        "POST {} HTTP/1.1\r\nHost: x\r\nProxy-Authorization: {auth}\r\nContent-Length: 5\r\n\r\nhello\
         GET {} HTTP/1.1\r\nHost: y\r\nProxy-Authorization: {auth}\r\n\r\n\
         GET {} HTTP/1.1\r\nHost: x\r\nProxy-Authorization: {auth}\r\n\r\n",
        o1.url("/one"),
        o2.url("/two"),
        o1.url("/three")
    );
    let got = proxy.raw(req.as_bytes());
    let text = String::from_utf8_lossy(&got).to_string();
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.contains("\r\nConnection: close\r\n"), "{text}");
    assert_eq!(text.matches("HTTP/1.1").count(), 1, "{text}");
    let conns = o1.wait_connections(1);
    proxy.wait_log(" how=", 1);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(o1.connections().len(), 1);
    assert!(o2.connections().is_empty(), "the second origin was reached");
    let h = origin_head(&conns[0]);
    assert_eq!(
        &conns[0][h.len()..],
        b"hello",
        "{:?}",
        String::from_utf8_lossy(&conns[0])
    );
    assert_eq!(
        String::from_utf8_lossy(&conns[0])
            .matches("HTTP/1.1")
            .count(),
        1
    );
    assert!(!String::from_utf8_lossy(&conns[0]).contains("Proxy-Authorization"));

    // A chunked body (with a trailer) from an HTTP/1.1 client, then a request behind
    // it; and an HTTP/1.0 request, forwarded as 1.0.
    let (o3, o4) = (Origin::start(), Origin::start());
    let body = "4;ext=1\r\nwiki\r\n5\r\npedia\r\n0\r\nX-Sum: 9\r\n\r\n";
    let req = format!(
        "POST {} HTTP/1.1\r\nProxy-Authorization: {auth}\r\nTransfer-Encoding: chunked\r\n\r\n\
         {body}GET {} HTTP/1.1\r\nProxy-Authorization: {auth}\r\n\r\n",
        o3.url("/c"),
        o4.url("/d")
    );
    let got = proxy.raw(req.as_bytes());
    let (h, n) = util::hash_of(b"wikipedia");
    assert!(
        String::from_utf8_lossy(&got).ends_with(&format!("got {n} {h:x}\n")),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    let conns = o3.wait_connections(1);
    let head = origin_head(&conns[0]);
    assert_eq!(
        String::from_utf8_lossy(&conns[0][head.len()..]),
        "4\r\nwiki\r\n5\r\npedia\r\n0\r\nX-Sum: 9\r\n\r\n"
    );
    let got = proxy.raw(
        format!(
            "GET {} HTTP/1.0\r\nProxy-Authorization: {auth}\r\n\r\n",
            o4.url("/e")
        )
        .as_bytes(),
    );
    assert!(
        status_of(&got).starts_with("HTTP/1.1 200 "),
        "{}",
        proxy.log()
    );
    let conns = o4.wait_connections(1);
    assert_eq!(
        conns.len(),
        1,
        "the request behind the chunked body reached its origin"
    );
    assert!(
        origin_head(&conns[0]).starts_with("GET /e HTTP/1.0\r\n"),
        "{}",
        origin_head(&conns[0])
    );
    // One empty line before the request line is ignored (RFC 9112 2.2), as for CONNECT.
    let got = proxy.raw(
        format!(
            "\r\nGET {} HTTP/1.1\r\nProxy-Authorization: {auth}\r\n\r\n",
            o3.url("/f")
        )
        .as_bytes(),
    );
    assert!(
        status_of(&got).starts_with("HTTP/1.1 200 "),
        "{}",
        proxy.log()
    );
}

#[test]
fn refusals_have_their_status_and_reach_no_origin() {
    let dir = scratch("refusals");
    let users = users(&dir);
    let proxy = Proxy::loopback(&users);
    let origin = Origin::start();
    let auth = basic();
    let u = origin.url("/x");
    let host = format!("127.0.0.1:{}", origin.port);
    let cases: Vec<(String, &str)> = vec![
        (format!("GET {u} HTTP/1.1\r\nHost: {host}\r\n\r\n"), "407"),
        (
            format!("GET {u} HTTP/1.1\r\nProxy-Authorization: Basic YWxpY2U6bm8=\r\n\r\n"),
            "407",
        ),
        (
            format!("POST {u} HTTP/1.1\r\nProxy-Authorization: {auth}\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"),
            "400",
        ),
        (
            format!("POST {u} HTTP/1.1\r\nProxy-Authorization: {auth}\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"),
            "400",
        ),
        (
            format!("POST {u} HTTP/1.1\r\nProxy-Authorization: {auth}\r\nTransfer-Encoding: chunked,\r\n\r\n0\r\n\r\n"),
            "400",
        ),
        (
            format!("POST {u} HTTP/1.1\r\nProxy-Authorization: {auth}\r\nTransfer-Encoding: gzip\r\n\r\n"),
            "400",
        ),
        (
            format!("GET https://{host}/x HTTP/1.1\r\nProxy-Authorization: {auth}\r\n\r\n"),
            "400",
        ),
        (
            format!("GET http://u:p@{host}/x HTTP/1.1\r\nProxy-Authorization: {auth}\r\n\r\n"),
            "400",
        ),
        (
            format!("GET ftp://{host}/x HTTP/1.1\r\nProxy-Authorization: {auth}\r\n\r\n"),
            "400",
        ),
        (
            format!("GET {u} HTTP/1.1\r\nProxy-Authorization: {auth}\r\nBad Header: x\r\n\r\n"),
            "400",
        ),
        (
            format!("GET {u} HTTP/1.1\r\nProxy-Authorization: {auth}\r\nX: a\nY: b\r\n\r\n"),
            "400",
        ),
    ];
    for (req, code) in &cases {
        let got = proxy.raw(req.as_bytes());
        let status = status_of(&got);
        assert!(
            status.starts_with(&format!("HTTP/1.1 {code} ")),
            "{req:?} -> {status:?}; log: {}",
            proxy.log()
        );
        let head = head_text(&got);
        assert!(head.contains("Connection: close\r\n"), "{head}");
        if *code == "407" {
            assert!(head.contains("Proxy-Authenticate: Basic realm="), "{head}");
        }
    }
    // Target refusals after DNS: a proxy without the loopback rule (403), a closed
    // port (502), a name that does not resolve (502).
    let strict = Proxy::start(&users, &[], &[]);
    let got =
        strict.raw(format!("GET {u} HTTP/1.1\r\nProxy-Authorization: {auth}\r\n\r\n").as_bytes());
    assert!(
        status_of(&got).starts_with("HTTP/1.1 403 "),
        "{}",
        strict.log()
    );
    let (l, a) = util::listener();
    drop(l);
    let got = proxy
        .raw(format!("GET http://{a}/ HTTP/1.1\r\nProxy-Authorization: {auth}\r\n\r\n").as_bytes());
    assert!(
        status_of(&got).starts_with("HTTP/1.1 502 "),
        "{}",
        proxy.log()
    );
    let got = proxy.raw(
        format!("GET http://no-such-host.invalid/ HTTP/1.1\r\nProxy-Authorization: {auth}\r\n\r\n")
            .as_bytes(),
    );
    assert!(
        status_of(&got).starts_with("HTTP/1.1 502 "),
        "{}",
        proxy.log()
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        origin.connections().is_empty(),
        "a refused request reached the origin: {:?}",
        origin.connections()
    );
    // A broken chunked body: the origin got the head, never a complete request, and the
    // client a 400.
    let got = proxy.raw(
        format!("POST {u} HTTP/1.1\r\nProxy-Authorization: {auth}\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n\r\n").as_bytes(),
    );
    assert!(
        status_of(&got).starts_with("HTTP/1.1 400 "),
        "{}",
        proxy.log()
    );
    let conns = origin.wait_connections(1);
    let h = origin_head(&conns[0]);
    assert_eq!(
        &conns[0][h.len()..],
        b"3\r\nabc\r\n",
        "{:?}",
        String::from_utf8_lossy(&conns[0])
    );
    proxy.wait_log("how=refused", 1);
}

#[test]
fn a_silent_origin_gets_a_504_after_the_idle_timeout() {
    let dir = scratch("slow");
    let proxy = Proxy::start(&users(&dir), &["-a", "127.0.0.0/8"], &["-t", "1"]);
    let origin = Origin::start();
    let t = Instant::now();
    let got = proxy.raw(
        format!(
            "GET {} HTTP/1.1\r\nProxy-Authorization: {}\r\n\r\n",
            origin.url("/slow"),
            basic()
        )
        .as_bytes(),
    );
    assert!(
        status_of(&got).starts_with("HTTP/1.1 504 "),
        "{}",
        proxy.log()
    );
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
}

#[test]
fn connect_still_tunnels_and_a_direct_request_is_not_forwarded() {
    let dir = scratch("connect");
    let proxy = Proxy::loopback(&users(&dir));
    let origin = Origin::start();
    let r = curl(&proxy, &["-p", &origin.url("/tunnel")]);
    r.expect_code(0);
    assert_eq!(String::from_utf8_lossy(&r.stdout), "hello /tunnel\n");
    // Origin-form to the proxy itself is no forwarding request.
    let got = proxy.raw(
        format!(
            "GET /x HTTP/1.1\r\nProxy-Authorization: {}\r\n\r\n",
            basic()
        )
        .as_bytes(),
    );
    assert!(
        status_of(&got).starts_with("HTTP/1.1 405 "),
        "{}",
        proxy.log()
    );
}

/// tcpsplice-auth alone on a socket, `-n`: the next program prints the forwarding
/// variables and then what is left unread in the socket.
fn auth_alone(input: &[u8], env: &[(&str, &str)]) -> Ran {
    let (mut client, server) = util::tcp_pair();
    let so = server.try_clone().expect("clone");
    let mut cmd = Command::new(AUTH);
    cmd.args([
        "-n",
        "sh",
        "-c",
        "printf 'ENV[%s|%s|%s|%s|%s]\\n' \"${TCPSPLICE_TARGET-unset}\" \
         \"${TCPSPLICE_REPLY-unset}\" \"${TCPSPLICE_HTTP_HEAD-unset}\" \
         \"${TCPSPLICE_HTTP_BODY-unset}\" \"${TCPSPLICE_HTTP_CONTINUE-unset}\" >&2; \
         exec cat >&2",
    ])
    .env("TCPSPLICE_LOG", "stderr")
    .stdin(Stdio::from(std::os::fd::OwnedFd::from(server)))
    .stdout(Stdio::from(std::os::fd::OwnedFd::from(so)))
    .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("spawn tcpsplice-auth");
    drop(cmd);
    client.write_all(input).expect("send");
    util::half_close(&client);
    util::finish(child, "tcpsplice-auth -n", LIMIT)
}

#[test]
fn auth_exports_the_rewritten_head_and_leaves_the_body_unread() {
    let req = b"PUT http://example.com:8080/p HTTP/1.1\r\nHost: example.com\r\n\
        Expect: 100-continue\r\nContent-Length: 5\r\nProxy-Connection: keep-alive\r\n\r\n\
        helloGET http://other/ HTTP/1.1\r\n\r\n";
    let r = auth_alone(req, &[]);
    r.expect_code(0);
    let e = r.stderr_text();
    assert!(
        e.contains(
            "ENV[example.com:8080|http-forward|PUT /p HTTP/1.1\r\nHost: example.com:8080\r\n\
             Content-Length: 5\r\nConnection: close\r\n\r\n|5|1]\n\
             helloGET http://other/ HTTP/1.1\r\n\r\n"
        ),
        "{}",
        r.show()
    );
    // CONNECT: nothing inherited passes for the forwarding variables.
    let r = auth_alone(
        b"CONNECT a.example:443 HTTP/1.1\r\n\r\n",
        &[
            ("TCPSPLICE_HTTP_HEAD", "GET / HTTP/1.1\r\n\r\n"),
            ("TCPSPLICE_HTTP_BODY", "5"),
            ("TCPSPLICE_HTTP_CONTINUE", "1"),
        ],
    );
    r.expect_code(0);
    assert!(
        r.stderr_text()
            .contains("ENV[a.example:443|http|unset|unset|unset]"),
        "{}",
        r.show()
    );
}

/// Every connection the origin had carried exactly one request and no proxy header.
fn one_request_each(conns: &[Vec<u8>]) {
    assert!(!conns.is_empty());
    for c in conns {
        let text = String::from_utf8_lossy(c);
        assert_eq!(text.matches(" HTTP/1.").count(), 1, "{text}");
        assert!(!text.to_ascii_lowercase().contains("proxy-"), "{text}");
    }
}

fn sh(dir: &std::path::Path, script: &str) {
    let r = run(
        "sh",
        &["-ec".into(), format!("cd '{}'; {script}", dir.display())],
        &[],
    );
    r.expect_code(0);
}

#[test]
fn apt_get_update_and_download_from_a_flat_repository() {
    let dir = scratch("apt");
    let repo = dir.join("repo");
    let pkg = dir.join("pkg");
    std::fs::create_dir_all(pkg.join("DEBIAN")).expect("mkdir");
    std::fs::create_dir_all(pkg.join("usr/share/tcpsplice-demo")).expect("mkdir");
    std::fs::create_dir_all(&repo).expect("mkdir");
    std::fs::write(
        pkg.join("DEBIAN/control"),
        "Package: tcpsplice-demo\nVersion: 1.0\nArchitecture: all\n\
         Maintainer: t <t@example.com>\nDescription: test package\n",
    )
    .expect("control");
    std::fs::write(
        pkg.join("usr/share/tcpsplice-demo/data"),
        util::pattern(3, 300_000),
    )
    .expect("data");
    sh(
        &dir,
        "dpkg-deb -Znone --build pkg repo/tcpsplice-demo_1.0_all.deb >/dev/null; cd repo; \
         apt-ftparchive packages . > Packages; gzip -k Packages; \
         apt-ftparchive release . > Release",
    );
    let proxy = Proxy::loopback(&users(&dir));
    let origin = Origin::files(&repo);
    let state = dir.join("state");
    for d in ["lists/partial", "cache/archives/partial"] {
        std::fs::create_dir_all(state.join(d)).expect("mkdir");
    }
    let sources = dir.join("sources.list");
    std::fs::write(
        &sources,
        format!("deb [trusted=yes] http://127.0.0.1:{}/ ./\n", origin.port),
    )
    .expect("sources");
    let status = dir.join("status");
    std::fs::write(&status, "").expect("status");
    let opts = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            format!("Dir::Etc::SourceList={}", sources.display()),
            "Dir::Etc::SourceParts=/nonexistent".into(),
            format!("Dir::State={}", state.display()),
            format!("Dir::State::Lists={}", state.join("lists").display()),
            format!("Dir::State::status={}", status.display()),
            format!("Dir::Cache={}", state.join("cache").display()),
            "Debug::NoLocking=1".into(),
            "APT::Sandbox::User=root".into(),
            "Acquire::Retries=3".into(),
            "Acquire::http::Timeout=20".into(),
            "Acquire::http::Pipeline-Depth=5".into(),
            format!(
                "Acquire::http::Proxy=http://{USER}:{PW}@127.0.0.1:{}/",
                proxy.port
            ),
        ]
        .into_iter()
        .flat_map(|o| ["-o".to_string(), o])
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let r = run("apt-get", &opts(&["-q", "update"]), &[]);
    r.expect_code(0);
    let lists = std::fs::read_dir(state.join("lists"))
        .expect("lists")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect::<Vec<_>>();
    assert!(
        lists.iter().any(|n| n.contains("_Packages")),
        "{lists:?}{}",
        r.show()
    );
    let r = run(
        "sh",
        &[
            "-c".into(),
            format!("cd '{}' && exec \"$@\"", dir.display()),
            "sh".into(),
            "apt-get".into(),
        ]
        .into_iter()
        .chain(opts(&["-q", "download", "tcpsplice-demo"]))
        .collect::<Vec<_>>(),
        &[],
    );
    r.expect_code(0);
    let got = std::fs::read(dir.join("tcpsplice-demo_1.0_all.deb")).expect("downloaded .deb");
    let want = std::fs::read(repo.join("tcpsplice-demo_1.0_all.deb")).expect("repo .deb");
    assert_eq!(util::hash_of(&got), util::hash_of(&want));
    let needle = format!("user={USER} target=127.0.0.1:{}", origin.port);
    let log = proxy.wait_log(&needle, 1);
    assert!(log.contains(&needle), "{log}");
    one_request_each(&origin.connections());
}

#[test]
fn git_clone_over_dumb_http() {
    let dir = scratch("git");
    let srv = dir.join("srv");
    std::fs::create_dir_all(&srv).expect("mkdir");
    std::fs::write(dir.join("big"), util::pattern(5, 500_000)).expect("file");
    sh(
        &dir,
        "git init -q work; cp big work/; cd work; git add big; \
         git -c user.name=t -c user.email=t@example.com commit -qm one; cd ..; \
         git clone -q --bare work srv/repo.git; cd srv/repo.git; git gc -q; \
         git update-server-info",
    );
    let proxy = Proxy::loopback(&users(&dir));
    let origin = Origin::files(&srv);
    let dest = dir.join("clone");
    let r = run(
        "git",
        &[
            "-c".into(),
            format!("http.proxy=http://{USER}:{PW}@127.0.0.1:{}", proxy.port),
            "clone".into(),
            "-q".into(),
            format!("http://127.0.0.1:{}/repo.git", origin.port),
            dest.display().to_string(),
        ],
        &[("GIT_TERMINAL_PROMPT", "0".into())],
    );
    r.expect_code(0);
    let got = std::fs::read(dest.join("big")).expect("cloned file");
    assert_eq!(
        util::hash_of(&got),
        util::hash_of(&util::pattern(5, 500_000))
    );
    one_request_each(&origin.connections());
}

#[test]
fn pip_download_from_a_simple_index() {
    let dir = scratch("pip");
    let srv = dir.join("srv");
    std::fs::create_dir_all(srv.join("simple/demo-pkg")).expect("mkdir");
    let wheel = "demo_pkg-1.0-py3-none-any.whl";
    sh(
        &dir,
        &format!(
            "python3 - <<'PY'\n\
import zipfile\n\
z = zipfile.ZipFile('srv/{wheel}', 'w')\n\
z.writestr('demo_pkg/__init__.py', 'x = 1\\n' * 1000)\n\
z.writestr('demo_pkg-1.0.dist-info/METADATA', 'Metadata-Version: 2.1\\nName: demo-pkg\\nVersion: 1.0\\n')\n\
z.writestr('demo_pkg-1.0.dist-info/WHEEL', 'Wheel-Version: 1.0\\nGenerator: t\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n')\n\
z.writestr('demo_pkg-1.0.dist-info/RECORD', '')\n\
z.close()\n\
PY"
        ),
    );
    std::fs::write(
        srv.join("simple/demo-pkg/index.html"),
        format!("<!DOCTYPE html><html><body><a href=\"../../{wheel}\">{wheel}</a></body></html>\n"),
    )
    .expect("index");
    let proxy = Proxy::loopback(&users(&dir));
    let origin = Origin::files(&srv);
    let dest = dir.join("dl");
    let r = run(
        "python3",
        &[
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--no-cache-dir",
            "--disable-pip-version-check",
            "--retries",
            "0",
            "--timeout",
            "20",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([
            "--proxy".into(),
            format!("http://{USER}:{PW}@127.0.0.1:{}", proxy.port),
            "--index-url".into(),
            format!("http://127.0.0.1:{}/simple/", origin.port),
            "--trusted-host".into(),
            "127.0.0.1".into(),
            "-d".into(),
            dest.display().to_string(),
            "demo-pkg==1.0".into(),
        ])
        .collect::<Vec<_>>(),
        &[("PIP_CONFIG_FILE", "/dev/null".into())],
    );
    r.expect_code(0);
    let got = std::fs::read(dest.join(wheel)).expect("downloaded wheel");
    let want = std::fs::read(srv.join(wheel)).expect("wheel");
    assert_eq!(got, want);
    one_request_each(&origin.connections());
}

#[test]
fn an_early_response_to_an_upload_reaches_the_client() {
    let dir = scratch("early");
    let proxy = Proxy::loopback(&users(&dir));
    let origin = Origin::start();
    let mut s = TcpStream::connect(("127.0.0.1", proxy.port)).expect("connect proxy");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let len = 64 << 20;
    let head = format!(
        "PUT {} HTTP/1.1\r\nProxy-Authorization: {}\r\nContent-Length: {len}\r\n\r\n",
        origin.url("/reject"),
        basic()
    );
    let mut w = s.try_clone().expect("clone");
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(head.as_bytes());
        let _ = util::send_pattern(&mut w, 1, len);
    });
    // The response comes while the origin still holds the connection (6 s; the login's
    // hash in a debug build takes a while on a loaded machine).
    let t = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.ends_with(b"\r\n\r\nbig\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&got).to_string();
    assert!(
        text.starts_with("HTTP/1.1 413 ") && text.ends_with("\r\n\r\nbig\n"),
        "{text:?} after {:?}; {}",
        t.elapsed(),
        proxy.log()
    );
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // Nothing follows the response: not the client's own upload bytes.
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty(), "{} bytes after the response", rest.len());
    drop(s);
    let _ = writer.join();
}

#[test]
fn a_response_cut_by_the_origin_reaches_the_client_as_a_reset() {
    let dir = scratch("cut");
    let proxy = Proxy::loopback(&users(&dir));
    let origin = Origin::start();
    let mut s = proxy.send_get(&origin.url("/cut"));
    let mut got = Vec::new();
    let r = s.read_to_end(&mut got);
    expect_reset(&r, &got, &proxy);
    proxy.wait_log("how=reset-by-target", 1);
}

/// The read ended with a reset.
fn expect_reset(r: &std::io::Result<usize>, got: &[u8], proxy: &Proxy) {
    assert!(
        r.as_ref()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "{r:?} after {} bytes; {}",
        got.len(),
        proxy.log()
    );
}

/// Through `proxy`: a request for `/drip`; once its first part has come, the proxy is
/// told to stop twice (the second SIGTERM reaches the connection). Returns what came and
/// how the read ended.
fn drip_and_stop(proxy: &Proxy, origin: &Origin) -> (Vec<u8>, std::io::Result<usize>) {
    let mut s = proxy.send_get(&origin.url("/drip"));
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.ends_with(&[b'a'; 1000]) {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    proxy.signal(libc::SIGTERM);
    proxy.wait_log("stopping:", 1);
    proxy.signal(libc::SIGTERM);
    proxy.wait_log("terminating:", 1);
    let r = s.read_to_end(&mut got);
    (got, r)
}

#[test]
fn a_stop_lets_a_response_finish_within_the_grace_and_resets_it_after() {
    let dir = scratch("grace");
    let users = users(&dir);
    let origin = Origin::start();
    let proxy = Proxy::loopback(&users);
    let (got, r) = drip_and_stop(&proxy, &origin);
    assert!(r.is_ok(), "{r:?}; {}", proxy.log());
    assert!(
        got.ends_with(&[b'b'; 1000]),
        "{} bytes; {}",
        got.len(),
        proxy.log()
    );
    assert_eq!(got.len(), head_text(&got).len() + 2000);
    proxy.wait_log("how=signal-15", 1);
    // A grace shorter than the response: the client learns it was cut.
    let proxy = Proxy::start(&users, &["-a", "127.0.0.0/8"], &["-g", "0.3"]);
    let (got, r) = drip_and_stop(&proxy, &origin);
    expect_reset(&r, &got, &proxy);
    proxy.wait_log("how=signal-15-undrained", 1);
}
