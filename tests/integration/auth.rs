//! tcpsplice-auth: the handshakes of SOCKS5, SOCKS4/4a and HTTP CONNECT over a real
//! loopback socket and over pipes, the environment handed to the next program, the
//! bytes pipelined behind a request reaching it intact, credentials checked against real
//! hashes made by mkpasswd, htpasswd and argon2, weak formats refused at load, and
//! delegation to a checkpassword program.
//!
//! The next program is a shell that prints its environment on stderr and then `cat`s:
//! whatever it echoes is exactly what tcpsplice-auth left unread.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::util::{self, Ran};

const AUTH: &str = env!("CARGO_BIN_EXE_tcpsplice-auth");
const LIMIT: Duration = Duration::from_secs(30);
pub(super) const PW: &str = "s3cret pass:word";

/// The next program: prints the environment it got, then echoes its input.
const SHOW_ENV: &[&str] = &[
    "sh",
    "-c",
    "printf 'ENV[%s|%s|%s|%s|%s|%s]\\n' \"$TCPSPLICE_TARGET\" \"${TCPSPLICE_USER-unset}\" \
     \"$TCPSPLICE_REPLY\" \"${TCPSPLICE_RULES-unset}\" \"${LISTEN_FDS-unset}\" \
     \"${TCPREMOTEIP-unset}\" >&2; exec cat",
];

fn env_line(r: &Ran) -> Option<String> {
    let e = r.stderr_text();
    let start = e.find("ENV[")?;
    let end = e[start..].find("]\n")?;
    Some(e[start + 4..start + end].to_string())
}

fn auth_cmd(opts: &[&str]) -> Command {
    let mut c = Command::new(AUTH);
    c.args(opts).args(SHOW_ENV).env("TCPSPLICE_LOG", "stderr");
    c
}

/// Runs tcpsplice-auth with fds 0/1 on a loopback socket; writes `input` in one write,
/// half-closes, and returns everything the client got back, and the run.
fn over_socket(mut cmd: Command, input: &[u8]) -> (Vec<u8>, Ran) {
    let (client, server) = util::tcp_pair();
    let so = server.try_clone().expect("clone");
    cmd.stdin(Stdio::from(OwnedFd::from(server)))
        .stdout(Stdio::from(OwnedFd::from(so)))
        .stderr(Stdio::piped());
    let child = cmd.spawn().expect("spawn tcpsplice-auth");
    let desc = format!("{cmd:?}");
    drop(cmd);
    let got = talk(client, input);
    let ran = util::finish(child, &desc, LIMIT);
    (got, ran)
}

fn talk(mut client: TcpStream, input: &[u8]) -> Vec<u8> {
    client.set_read_timeout(Some(LIMIT)).expect("read timeout");
    let mut w = client.try_clone().expect("clone");
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(&input);
        let _ = w.shutdown(std::net::Shutdown::Write);
    });
    let mut got = Vec::new();
    let _ = client.read_to_end(&mut got);
    let _ = writer.join();
    got
}

/// The same with fds 0/1 on pipes.
fn over_pipes(mut cmd: Command, input: &[u8]) -> (Vec<u8>, Ran) {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn tcpsplice-auth");
    let mut stdin = child.stdin.take().expect("stdin");
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let ran = util::finish(child, &format!("{cmd:?}"), LIMIT);
    let _ = writer.join();
    (ran.stdout.clone(), ran)
}

/// A scratch directory of the test's own.
pub(super) fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tcpsplice-auth-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

fn write_users(name: &str, text: &str) -> PathBuf {
    let p = scratch(name).join("users");
    std::fs::write(&p, text).expect("write users");
    p
}

/// Real hashes of PW, as the tools people use make them.
fn mkpasswd(method: &str) -> String {
    util::tool("mkpasswd", &["-m", method, "-s"], PW)
}

fn htpasswd(flags: &[&str], user: &str) -> String {
    let mut a = vec!["-n", "-b"];
    a.extend_from_slice(flags);
    a.extend_from_slice(&[user, PW]);
    util::tool("htpasswd", &a, "")
}

fn argon2id() -> String {
    util::tool(
        "argon2",
        &[
            "tcpsplicesalt16",
            "-id",
            "-t",
            "2",
            "-m",
            "15",
            "-p",
            "1",
            "-e",
        ],
        PW,
    )
}

fn sha512_users(name: &str) -> PathBuf {
    write_users(
        name,
        &format!("# test users\n\nalice:{}\n", mkpasswd("sha-512")),
    )
}

fn socks5_userpass(user: &str, pw: &str) -> Vec<u8> {
    let mut v = vec![0x01, user.len() as u8];
    v.extend_from_slice(user.as_bytes());
    v.push(pw.len() as u8);
    v.extend_from_slice(pw.as_bytes());
    v
}

fn socks5_domain(name: &str, port: u16) -> Vec<u8> {
    let mut v = vec![0x05, 0x01, 0x00, 0x03, name.len() as u8];
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&port.to_be_bytes());
    v
}

fn http_connect(target: &str, auth: Option<(&str, &str)>) -> Vec<u8> {
    let mut s = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: test\r\n");
    if let Some((u, p)) = auth {
        // PySocks sends the scheme in lower case.
        s.push_str(&format!(
            "Proxy-Authorization: basic {}\r\n",
            util::basic(u, p)
        ));
    }
    s.push_str("\r\n");
    s.into_bytes()
}

/// Payload a client pipelines behind its request; it holds CRLF CRLF and SOCKS-like
/// bytes so that reading too far, or parsing it, would show.
fn payload() -> Vec<u8> {
    let mut p = b"\r\n\r\nGET / HTTP/1.1\r\n\r\n\x05\x01\x00".to_vec();
    p.extend_from_slice(&util::pattern(7, 64 * 1024));
    p
}

fn expect_echo(got: &[u8], prefix: &[u8], payload: &[u8], r: &Ran) {
    assert!(
        got.len() >= prefix.len() && &got[..prefix.len()] == prefix,
        "reply {:02x?} is not {prefix:02x?}{}",
        &got[..got.len().min(40)],
        r.show()
    );
    assert_eq!(
        util::hash_of(&got[prefix.len()..]),
        util::hash_of(payload),
        "pipelined bytes did not reach the next program intact{}",
        r.show()
    );
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

// ---------------------------------------------------------------- SOCKS5

#[test]
fn socks5_no_auth_pipelined_over_socket() {
    let p = payload();
    let input = cat(&[b"\x05\x02\x00\x01", &socks5_domain("example.com", 443), &p]);
    let (got, r) = over_socket(auth_cmd(&["-n"]), &input);
    r.expect_code(0);
    expect_echo(&got, b"\x05\x00", &p, &r);
    assert_eq!(
        env_line(&r).as_deref(),
        Some("example.com:443|unset|socks5|unset|unset|127.0.0.1"),
        "{}",
        r.show()
    );
}

#[test]
fn socks5_user_password_yescrypt_from_mkpasswd() {
    let users = write_users("s5yes", &format!("alice:{}\n", mkpasswd("yescrypt")));
    let p = payload();
    let input = cat(&[
        b"\x05\x02\x00\x02",
        &socks5_userpass("alice", PW),
        b"\x05\x01\x00\x01\xc0\x00\x02\x07\x00\x50",
        &p,
    ]);
    let (got, r) = over_socket(auth_cmd(&["-f", users.to_str().unwrap()]), &input);
    r.expect_code(0);
    expect_echo(&got, b"\x05\x02\x01\x00", &p, &r);
    assert_eq!(
        env_line(&r).as_deref(),
        Some("192.0.2.7:80|alice|socks5|unset|unset|127.0.0.1"),
        "{}",
        r.show()
    );
}

#[test]
fn socks5_ipv6_target_over_pipes() {
    let mut req = vec![0x05, 0x01, 0x00, 0x04];
    req.extend_from_slice(
        &"2001:db8::1"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
    );
    req.extend_from_slice(&8443u16.to_be_bytes());
    let p = payload();
    let (got, r) = over_pipes(auth_cmd(&["-n"]), &cat(&[b"\x05\x01\x00", &req, &p]));
    r.expect_code(0);
    expect_echo(&got, b"\x05\x00", &p, &r);
    assert_eq!(
        env_line(&r).as_deref(),
        Some("[2001:db8::1]:8443|unset|socks5|unset|unset|unset"),
        "{}",
        r.show()
    );
}

#[test]
fn socks5_wrong_password_and_unknown_user_look_the_same() {
    let users = sha512_users("s5bad");
    let mut replies = Vec::new();
    for (u, pw) in [("alice", "wrong"), ("mallory", PW), ("", "")] {
        let input = cat(&[
            b"\x05\x01\x02",
            &socks5_userpass(u, pw),
            &socks5_domain("example.com", 80),
        ]);
        let (got, r) = over_socket(
            auth_cmd(&["-d", "0.1", "-f", users.to_str().unwrap()]),
            &input,
        );
        r.expect_code(1);
        assert!(env_line(&r).is_none(), "next program ran{}", r.show());
        assert!(r.stderr_text().contains("auth failed"), "{}", r.show());
        assert!(
            !r.stderr_text().contains("wrong"),
            "password logged{}",
            r.show()
        );
        replies.push(got);
    }
    assert_eq!(replies[0], b"\x05\x02\x01\x01");
    assert_eq!(replies[0], replies[1]);
    assert_eq!(replies[0], replies[2]);
}

#[test]
fn socks5_no_auth_refused_unless_asked_for() {
    let users = sha512_users("s5noauth");
    let input = cat(&[b"\x05\x01\x00", &socks5_domain("example.com", 80)]);
    let (got, r) = over_socket(auth_cmd(&["-f", users.to_str().unwrap()]), &input);
    r.expect_code(1);
    assert_eq!(got, b"\x05\xff", "{}", r.show());
    // With -n as well, the same client goes through without a user.
    let (got, r) = over_socket(auth_cmd(&["-n", "-f", users.to_str().unwrap()]), &input);
    r.expect_code(0);
    assert_eq!(got, b"\x05\x00", "{}", r.show());
    assert_eq!(
        env_line(&r).as_deref(),
        Some("example.com:80|unset|socks5|unset|unset|127.0.0.1")
    );
}

#[test]
fn no_auth_only_for_clients_from_n_rules() {
    // -N: the client's address (TCPREMOTEIP, as a supervisor sets it) decides.
    let users = sha512_users("s5noauthfrom");
    let f = users.to_str().unwrap();
    let input = cat(&[b"\x05\x01\x00", &socks5_domain("example.com", 80)]);
    let from = |ip: &str, opts: &[&str]| {
        let mut cmd = auth_cmd(opts);
        cmd.env("TCPREMOTEIP", ip).env("TCPREMOTEPORT", "4711");
        over_socket(cmd, &input)
    };
    let (got, r) = from("192.0.2.5", &["-N", "192.0.2.0/28", "-f", f]);
    r.expect_code(0);
    assert_eq!(got, b"\x05\x00", "inside the rule{}", r.show());
    let (got, r) = from("192.0.2.50", &["-N", "192.0.2.0/28", "-f", f]);
    r.expect_code(1);
    assert_eq!(got, b"\x05\xff", "outside the rule{}", r.show());
    // Without -f: those inside get in, nobody else.
    let (got, r) = from(
        "2001:db8::7",
        &["-N", "192.0.2.0/28", "-N", "2001:db8::/64"],
    );
    r.expect_code(0);
    assert_eq!(got, b"\x05\x00", "{}", r.show());
    let (got, r) = from("198.51.100.1", &["-N", "192.0.2.0/28"]);
    r.expect_code(1);
    assert_eq!(got, b"\x05\xff", "{}", r.show());
    // SOCKS4 has no credentials at all: the same rule lets it in.
    let s4 = b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00".to_vec();
    let mut cmd = auth_cmd(&["-N", "192.0.2.0/28", "-f", f]);
    cmd.env("TCPREMOTEIP", "192.0.2.1");
    let (_, r) = over_socket(cmd, &s4);
    r.expect_code(0);
    // A rule with a port is refused at start.
    let (_, r) = from("192.0.2.5", &["-N", "192.0.2.0/28:80", "-f", f]);
    r.expect_code(100);
}

#[test]
fn socks5_refusals_use_the_protocol_codes() {
    let cases: &[(&[u8], &[u8])] = &[
        // BIND: command not supported.
        (
            b"\x05\x01\x00\x05\x02\x00\x01\x7f\x00\x00\x01\x00\x50",
            b"\x05\x00\x05\x07\x00\x01\x00\x00\x00\x00\x00\x00",
        ),
        // ATYP 9: address type not supported.
        (
            b"\x05\x01\x00\x05\x01\x00\x09\x7f\x00\x00\x01\x00\x50",
            b"\x05\x00\x05\x08\x00\x01\x00\x00\x00\x00\x00\x00",
        ),
        // A bad request version.
        (
            b"\x05\x01\x00\x04\x01\x00\x01\x7f\x00\x00\x01\x00\x50",
            b"\x05\x00\x05\x01\x00\x01\x00\x00\x00\x00\x00\x00",
        ),
        // A host name with a NUL and a space.
        (
            b"\x05\x01\x00\x05\x01\x00\x03\x03a\x00b\x00\x50",
            b"\x05\x00\x05\x01\x00\x01\x00\x00\x00\x00\x00\x00",
        ),
        // Only GSSAPI offered; and no method at all.
        (b"\x05\x01\x01", b"\x05\xff"),
        (b"\x05\x00", b"\x05\xff"),
    ];
    for (input, want) in cases {
        let (got, r) = over_socket(auth_cmd(&["-n"]), input);
        r.expect_code(1);
        assert_eq!(&got, want, "for input {input:02x?}{}", r.show());
        assert!(env_line(&r).is_none(), "{}", r.show());
    }
}

/// A way to run tcpsplice-auth on a client's bytes: over pipes or over a socket.
type Over = fn(Command, &[u8]) -> (Vec<u8>, Ran);

#[test]
fn socks5_truncated_handshakes_end_without_running_the_next_program() {
    let users = sha512_users("s5trunc");
    let full = cat(&[
        b"\x05\x01\x02",
        &socks5_userpass("alice", PW),
        &socks5_domain("example.com", 80),
    ]);
    // Over pipes, and over a socket, where the handshake is peeked at and taken off in
    // one go at the end (a prefix may stop after a greeting already answered).
    let transports: [(&str, Over); 2] = [("pipes", over_pipes), ("socket", over_socket)];
    for (how, over) in transports {
        for n in 0..full.len() {
            let (_, r) = over(
                auth_cmd(&["-d", "0", "-t", "5", "-f", users.to_str().unwrap()]),
                &full[..n],
            );
            r.expect_code(1);
            assert!(env_line(&r).is_none(), "{how}, prefix {n}{}", r.show());
        }
    }
}

/// A client's step: bytes to send, a pause, how many reply bytes to wait for then.
type Step<'a> = (&'a [u8], Duration, usize);

/// Runs tcpsplice-auth on a loopback socket, the client sending `steps` one at a time,
/// each in its own segment: its bytes, a pause, then the reply bytes it waits for
/// before going on. The last step's bytes go as `over_socket`'s do (then a half-close).
/// Returns what the client got after the steps' replies, and the run.
fn over_socket_in_steps(mut cmd: Command, steps: &[Step], last: &[u8]) -> (Vec<u8>, Ran) {
    let (mut client, server) = util::tcp_pair();
    client.set_nodelay(true).expect("nodelay");
    client.set_read_timeout(Some(LIMIT)).expect("read timeout");
    let so = server.try_clone().expect("clone");
    cmd.stdin(Stdio::from(OwnedFd::from(server)))
        .stdout(Stdio::from(OwnedFd::from(so)))
        .stderr(Stdio::piped());
    let child = cmd.spawn().expect("spawn tcpsplice-auth");
    let desc = format!("{cmd:?}");
    drop(cmd);
    let mut replies = Vec::new();
    for &(bytes, pause, reply) in steps {
        client.write_all(bytes).expect("write a step");
        std::thread::sleep(pause);
        let mut r = vec![0u8; reply];
        client.read_exact(&mut r).expect("the step's reply");
        replies.extend_from_slice(&r);
    }
    let mut got = talk(client, last);
    replies.append(&mut got);
    let ran = util::finish(child, &desc, LIMIT);
    (replies, ran)
}

#[test]
fn socks5_messages_apart_or_in_pieces_leave_the_early_data_intact() {
    let p = payload();
    let greeting: &[u8] = b"\x05\x01\x00";
    let req = socks5_domain("example.com", 443);
    let with_start = cat(&[greeting, &req[..6]]);
    let pause = Duration::from_millis(50);
    let none = Duration::ZERO;
    let cases: Vec<(Vec<Step>, Vec<u8>)> = vec![
        // The greeting, its answer, then the request with the early data behind it.
        (vec![(greeting, none, 2)], cat(&[&req, &p])),
        // The request, then the early data once the request has surely been read.
        (vec![(greeting, none, 2), (&req, pause, 0)], p.clone()),
        // The request in two pieces, the second with the early data.
        (
            vec![(greeting, none, 2), (&req[..3], pause, 0)],
            cat(&[&req[3..], &p]),
        ),
        // The greeting with the start of the request, the rest later.
        (vec![(&with_start, pause, 2)], cat(&[&req[6..], &p])),
        // The greeting a byte at a time.
        (
            vec![
                (&greeting[..1], pause, 0),
                (&greeting[1..2], pause, 0),
                (&greeting[2..], none, 2),
            ],
            cat(&[&req, &p]),
        ),
    ];
    for (i, (steps, last)) in cases.iter().enumerate() {
        let (got, r) = over_socket_in_steps(auth_cmd(&["-n"]), steps, last);
        r.expect_code(0);
        expect_echo(&got, b"\x05\x00", &p, &r);
        assert_eq!(
            env_line(&r).as_deref(),
            Some("example.com:443|unset|socks5|unset|unset|127.0.0.1"),
            "case {i}{}",
            r.show()
        );
    }
}

#[test]
fn socks5_login_apart_or_pipelined_leaves_the_early_data_intact() {
    let users = sha512_users("s5steps");
    let p = payload();
    let greeting: &[u8] = b"\x05\x01\x02";
    let login = socks5_userpass("alice", PW);
    let req: &[u8] = b"\x05\x01\x00\x01\xc0\x00\x02\x07\x00\x50";
    let pause = Duration::from_millis(50);
    let none = Duration::ZERO;
    let cases: Vec<(Vec<Step>, Vec<u8>)> = vec![
        // Every message apart.
        (
            vec![(greeting, none, 2), (&login, none, 2)],
            cat(&[req, &p]),
        ),
        // The login and the request together.
        (vec![(greeting, none, 2)], cat(&[&login, req, &p])),
        // The login in two pieces.
        (
            vec![(greeting, none, 2), (&login[..4], pause, 0)],
            cat(&[&login[4..], req, &p]),
        ),
        // The request in two pieces after the login.
        (
            vec![
                (greeting, none, 2),
                (&login, none, 2),
                (&req[..5], pause, 0),
            ],
            cat(&[&req[5..], &p]),
        ),
    ];
    for (i, (steps, last)) in cases.iter().enumerate() {
        let (got, r) =
            over_socket_in_steps(auth_cmd(&["-f", users.to_str().unwrap()]), steps, last);
        r.expect_code(0);
        expect_echo(&got, b"\x05\x02\x01\x00", &p, &r);
        assert_eq!(
            env_line(&r).as_deref(),
            Some("192.0.2.7:80|alice|socks5|unset|unset|127.0.0.1"),
            "case {i}{}",
            r.show()
        );
    }
}

#[test]
fn socks5_slow_client_times_out() {
    // Half a greeting; and a greeting (answered) with half a request: then nothing,
    // with the connection kept open.
    for sent in [&b"\x05\x02\x00"[..], &b"\x05\x01\x00\x05\x01\x00"[..]] {
        let (mut client, server) = util::tcp_pair();
        let so = server.try_clone().unwrap();
        let mut cmd = auth_cmd(&["-n", "-t", "1"]);
        cmd.stdin(Stdio::from(OwnedFd::from(server)))
            .stdout(Stdio::from(OwnedFd::from(so)))
            .stderr(Stdio::piped());
        let child = cmd.spawn().unwrap();
        client.write_all(sent).unwrap();
        let r = util::finish(child, &format!("{cmd:?}"), LIMIT);
        r.expect_code(1);
        assert!(
            r.stderr_text().contains("timed out"),
            "{sent:02x?}{}",
            r.show()
        );
        drop(client);
    }
}

#[test]
fn protocols_can_be_restricted() {
    let (got, r) = over_socket(
        auth_cmd(&["-n", "-p", "http"]),
        &cat(&[b"\x05\x01\x00", &socks5_domain("a.example", 1)]),
    );
    r.expect_code(1);
    assert_eq!(got, b"\x05\xff", "{}", r.show());
    let (got, r) = over_socket(
        auth_cmd(&["-n", "-p", "socks5"]),
        &http_connect("a.example:1", None),
    );
    r.expect_code(1);
    assert!(got.starts_with(b"HTTP/1.1 403 "), "{}", r.show());
    let body = refusal_body(&String::from_utf8_lossy(&got));
    assert!(
        body.contains("use SOCKS5 (curl -x socks5h://HOST:PORT)"),
        "{body:?}"
    );
    let (got, r) = over_socket(
        auth_cmd(&["-n", "-p", "socks5,http"]),
        b"\x04\x01\x00\x50\x01\x02\x03\x04\x00",
    );
    r.expect_code(1);
    assert_eq!(got, b"\x00\x5b\0\0\0\0\0\0", "{}", r.show());
}

#[test]
fn unknown_protocol_is_closed() {
    let (got, r) = over_socket(auth_cmd(&["-n"]), b"\x16\x03\x01\x00\x10hello");
    r.expect_code(1);
    assert!(got.is_empty(), "{}", r.show());
    assert!(r.stderr_text().contains("unknown protocol"), "{}", r.show());
}

// ---------------------------------------------------------------- SOCKS4

#[test]
fn socks4_and_socks4a_with_no_auth() {
    let p = payload();
    let (got, r) = over_socket(
        auth_cmd(&["-n"]),
        &cat(&[b"\x04\x01\x1f\x90\xc6\x33\x64\x05user\x00", &p]),
    );
    r.expect_code(0);
    expect_echo(&got, b"", &p, &r);
    assert_eq!(
        env_line(&r).as_deref(),
        Some("198.51.100.5:8080|unset|socks4|unset|unset|127.0.0.1")
    );
    let (got, r) = over_pipes(
        auth_cmd(&["-n"]),
        &cat(&[
            b"\x04\x01\x00\x50\x00\x00\x00\x01\x00www.example.org\x00",
            &p,
        ]),
    );
    r.expect_code(0);
    expect_echo(&got, b"", &p, &r);
    assert_eq!(
        env_line(&r).as_deref(),
        Some("www.example.org:80|unset|socks4|unset|unset|unset")
    );
}

#[test]
fn socks4_refused_when_credentials_are_required_or_malformed() {
    let users = sha512_users("s4");
    let cases: &[(&[&str], &[u8])] = &[
        (&["-f"], b"\x04\x01\x00\x50\x01\x02\x03\x04alice\x00"),
        (&["-n"], b"\x04\x02\x00\x50\x01\x02\x03\x04\x00"),
        (&["-n"], b"\x04\x01\x00\x50\x00\x00\x00\x01\x00bad host\x00"),
        (&["-n"], b"\x04\x01\x00\x50\x01\x02"),
        (
            &["-n"],
            b"\x04\x01\x00\x50\x00\x00\x00\x01\x00truncated.example",
        ),
    ];
    for (opts, input) in cases {
        let mut o: Vec<&str> = opts.to_vec();
        if o == ["-f"] {
            o.push(users.to_str().unwrap());
        }
        let (got, r) = over_socket(auth_cmd(&o), input);
        r.expect_code(1);
        assert_eq!(got, b"\x00\x5b\0\0\0\0\0\0", "{input:02x?}{}", r.show());
        assert!(env_line(&r).is_none(), "{}", r.show());
    }
}

// ---------------------------------------------------------------- HTTP CONNECT

#[test]
fn http_connect_basic_over_socket_and_pipes() {
    let users = sha512_users("http");
    let p = payload();
    let input = cat(&[&http_connect("example.com:443", Some(("alice", PW))), &p]);
    let (got, r) = over_socket(auth_cmd(&["-f", users.to_str().unwrap()]), &input);
    r.expect_code(0);
    expect_echo(&got, b"", &p, &r);
    assert_eq!(
        env_line(&r).as_deref(),
        Some("example.com:443|alice|http|unset|unset|127.0.0.1")
    );
    let (got, r) = over_pipes(auth_cmd(&["-f", users.to_str().unwrap()]), &input);
    r.expect_code(0);
    expect_echo(&got, b"", &p, &r);
    assert!(!r.stderr_text().contains(PW), "password logged{}", r.show());
}

#[test]
fn http_head_nits_an_empty_line_first_and_a_nul_in_a_field() {
    let users = sha512_users("httpnits");
    let f = users.to_str().unwrap();
    let p = payload();
    // One empty line before the request line is ignored (RFC 9112 2.2), CRLF or LF.
    for lead in [&b"\r\n"[..], b"\n"] {
        let input = cat(&[
            lead,
            &http_connect("example.com:443", Some(("alice", PW))),
            &p,
        ]);
        let (got, r) = over_socket(auth_cmd(&["-f", f]), &input);
        r.expect_code(0);
        expect_echo(&got, b"", &p, &r);
    }
    // Two are not one; nor is a CR alone.
    for lead in [&b"\r\n\r\n"[..], b"\rC"] {
        let input = cat(&[lead, &http_connect("example.com:443", Some(("alice", PW)))]);
        let (_, r) = over_socket(auth_cmd(&["-f", f]), &input);
        r.expect_code(1);
    }
    // A NUL in a header field: 400, nothing run.
    let mut head = http_connect("example.com:443", Some(("alice", PW)));
    let at = head.len() - 2;
    head.splice(at..at, b"X-Junk: a\0b\r\n".iter().copied());
    let (got, r) = over_socket(auth_cmd(&["-f", f]), &head);
    r.expect_code(1);
    assert!(got.starts_with(b"HTTP/1.1 400 "), "{}", r.show());
    assert!(env_line(&r).is_none(), "the next program ran{}", r.show());
}

#[test]
fn http_head_in_slow_pieces_is_read_exactly() {
    // The head arrives in pieces, the last one splitting CRLF CRLF, and the payload
    // follows in the same write as the final LF: the peek path must stop right there.
    let (mut client, server) = util::tcp_pair();
    let so = server.try_clone().unwrap();
    let mut cmd = auth_cmd(&["-n"]);
    cmd.stdin(Stdio::from(OwnedFd::from(server)))
        .stdout(Stdio::from(OwnedFd::from(so)))
        .stderr(Stdio::piped());
    let child = cmd.spawn().unwrap();
    // The command holds the server's socket: dropped, the client sees the end of cat's
    // output instead of waiting for its read timeout.
    let desc = format!("{cmd:?}");
    drop(cmd);
    let p = payload();
    for piece in [
        &b"CONN"[..],
        b"ECT [2001:db8::7]:22 HTTP/1.0\r\n",
        b"X-A: b\r\n\r",
    ] {
        client.write_all(piece).unwrap();
        std::thread::sleep(Duration::from_millis(150));
    }
    let got = talk(client, &cat(&[b"\n", &p]));
    let r = util::finish(child, &desc, LIMIT);
    r.expect_code(0);
    expect_echo(&got, b"", &p, &r);
    assert_eq!(
        env_line(&r).as_deref(),
        Some("[2001:db8::7]:22|unset|http|unset|unset|127.0.0.1")
    );
}

/// The body of an HTTP refusal, checked to be one line of plain text that
/// Content-Length counts.
fn refusal_body(text: &str) -> String {
    let (head, body) = text.split_once("\r\n\r\n").expect("a head");
    assert!(
        head.contains("\r\nContent-Type: text/plain\r\n"),
        "{text:?}"
    );
    assert!(
        head.contains(&format!("\r\nContent-Length: {}\r\n", body.len())),
        "{text:?}"
    );
    assert!(
        body.ends_with('\n') && body.matches('\n').count() == 1,
        "not one line: {body:?}"
    );
    body.to_string()
}

#[test]
fn http_refusals() {
    let users = sha512_users("http-bad");
    let f = users.to_str().unwrap();
    let big = format!(
        "CONNECT a.example:1 HTTP/1.1\r\nX-Big: {}\r\n\r\n",
        "x".repeat(9000)
    );
    let cases: Vec<(Vec<u8>, &str, i32)> = vec![
        (http_connect("a.example:443", None), "407 ", 1),
        (
            http_connect("a.example:443", Some(("alice", "nope"))),
            "407 ",
            1,
        ),
        (http_connect("a.example:443", Some(("bob", PW))), "407 ", 1),
        (
            b"CONNECT a.example:443 HTTP/1.1\r\nProxy-Authorization: Digest x\r\n\r\n".to_vec(),
            "407 ",
            1,
        ),
        (
            b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n".to_vec(),
            "405 ",
            1,
        ),
        (b"CONNECT a.example HTTP/1.1\r\n\r\n".to_vec(), "400 ", 1),
        (b"CONNECT a.example:0 HTTP/1.1\r\n\r\n".to_vec(), "400 ", 1),
        (b"CONNECT a b:1 HTTP/1.1\r\n\r\n".to_vec(), "400 ", 1),
        (
            b"CONNECT a.example:1 HTTP/1.1\r\nno colon\r\n\r\n".to_vec(),
            "400 ",
            1,
        ),
        (b"hello\r\n\r\n".to_vec(), "400 ", 1),
        (big.into_bytes(), "431 ", 1),
    ];
    for (input, status, code) in cases {
        let (got, r) = over_socket(auth_cmd(&["-d", "0.1", "-f", f]), &input);
        r.expect_code(code);
        let text = String::from_utf8_lossy(&got).into_owned();
        assert!(
            text.starts_with(&format!("HTTP/1.1 {status}")),
            "for {:?}: got {text:?}{}",
            String::from_utf8_lossy(&input[..input.len().min(60)]),
            r.show()
        );
        if status == "407 " {
            assert!(
                text.contains("\r\nProxy-Authenticate: Basic realm=\"tcpsplice\"\r\n"),
                "{text:?}"
            );
        }
        if status == "405 " {
            assert!(text.contains("\r\nAllow: CONNECT\r\n"), "{text:?}");
        }
        // One line that says what to do instead.
        let advice = match status {
            "405 " => "This is a proxy, not a web server: ask it for a whole URL",
            "407 " => "needs a user name and password: put them in the proxy URL (curl -p -x http://USER:PASSWORD@HOST:PORT)",
            "400 " => "send \"CONNECT host:port HTTP/1.1\"",
            _ => "send the CONNECT with fewer or shorter headers",
        };
        let body = refusal_body(&text);
        assert!(body.contains(advice), "{status}: {body:?}");
        assert!(env_line(&r).is_none(), "{}", r.show());
    }
}

#[test]
fn http_truncated_and_slow_heads() {
    let full = http_connect("example.com:443", None);
    for n in [1, 5, 20, full.len() - 1] {
        let (_, r) = over_pipes(auth_cmd(&["-n"]), &full[..n]);
        r.expect_code(1);
        assert!(env_line(&r).is_none(), "prefix {n}{}", r.show());
    }
    // A client that never finishes its head gets 408 when the timeout ends.
    let (mut client, server) = util::tcp_pair();
    let so = server.try_clone().unwrap();
    let mut cmd = auth_cmd(&["-n", "-t", "1"]);
    cmd.stdin(Stdio::from(OwnedFd::from(server)))
        .stdout(Stdio::from(OwnedFd::from(so)))
        .stderr(Stdio::piped());
    let child = cmd.spawn().unwrap();
    client.write_all(&full[..full.len() - 2]).unwrap();
    client.set_read_timeout(Some(LIMIT)).unwrap();
    let r = util::finish(child, &format!("{cmd:?}"), LIMIT);
    r.expect_code(1);
    let mut got = Vec::new();
    let _ = client.read_to_end(&mut got);
    assert!(
        got.starts_with(b"HTTP/1.1 408 "),
        "{:?}{}",
        String::from_utf8_lossy(&got),
        r.show()
    );
    let body = refusal_body(&String::from_utf8_lossy(&got));
    assert!(
        body.contains("send the whole CONNECT request at once"),
        "{body:?}"
    );
}

// ---------------------------------------------------------------- users file and hashes

pub(super) fn login_http(users: &std::path::Path, user: &str, pw: &str) -> Ran {
    timed_login(users, "0", user, pw).1
}

/// A login over HTTP with fail delay `delay`, and how long it took from start to exit.
fn timed_login(users: &std::path::Path, delay: &str, user: &str, pw: &str) -> (Duration, Ran) {
    let start = std::time::Instant::now();
    let (_, r) = over_pipes(
        auth_cmd(&["-d", delay, "-f", users.to_str().unwrap()]),
        &http_connect("example.com:443", Some((user, pw))),
    );
    (start.elapsed(), r)
}

#[test]
fn real_hashes_from_the_usual_tools() {
    let bcrypt = htpasswd(&["-B", "-C", "12"], "bcuser");
    assert!(bcrypt.starts_with("bcuser:$2y$12$"), "{bcrypt}");
    let text = format!(
        "yes:{}\nsha512:{}\nsha256:{}\n{bcrypt}\nargon:{}\n",
        mkpasswd("yescrypt"),
        mkpasswd("sha-512"),
        mkpasswd("sha-256"),
        argon2id()
    );
    let users = write_users("real", &text);
    for user in ["yes", "sha512", "sha256", "bcuser", "argon"] {
        let r = login_http(&users, user, PW);
        r.expect_code(0);
        assert_eq!(
            env_line(&r),
            Some(format!("example.com:443|{user}|http|unset|unset|unset")),
            "{}",
            r.show()
        );
        let r = login_http(&users, user, "s3cret pass:wore");
        r.expect_code(1);
        assert!(env_line(&r).is_none(), "{}", r.show());
    }
}

#[test]
fn hash_option_makes_a_hash_that_logs_in() {
    let mut c = Command::new(AUTH);
    c.arg("-H").stdin(Stdio::piped());
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{PW}\n").as_bytes())
        .unwrap();
    let r = util::finish(child, "tcpsplice-auth -H", LIMIT);
    r.expect_code(0);
    let hash = String::from_utf8(r.stdout.clone()).unwrap();
    assert!(hash.starts_with("$y$"), "{}", r.show());
    let users = write_users("hashopt", &format!("carol:{}", hash.trim()));
    login_http(&users, "carol", PW).expect_code(0);
    login_http(&users, "carol", "x").expect_code(1);
}

/// `tcpsplice-auth -H` on a terminal, typing `first` then `second` at its prompts;
/// returns its result (the hash on stdout) and everything the terminal showed.
fn hash_on_a_terminal(first: &str, second: &str) -> (Ran, String) {
    use std::sync::{Arc, Mutex};
    let mut c = Command::new(AUTH);
    c.arg("-H").stdout(Stdio::piped());
    let mut master = util::on_pty(&mut c);
    let child = c.spawn().expect("tcpsplice-auth -H");
    drop(c); // the terminal's end that the child has
    let screen = Arc::new(Mutex::new(Vec::new()));
    let (s2, mut reader) = (screen.clone(), master.try_clone().expect("dup"));
    let reading = std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        // Ends with EIO once the child has exited and closed the terminal.
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 {
                break;
            }
            s2.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    let shown = || String::from_utf8_lossy(&screen.lock().unwrap()).into_owned();
    for (prompt, typed) in [("Password: ", first), ("Password again: ", second)] {
        let end = std::time::Instant::now() + LIMIT;
        while !shown().contains(prompt) {
            assert!(
                std::time::Instant::now() < end,
                "no {prompt:?}: {:?}",
                shown()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        master
            .write_all(format!("{typed}\n").as_bytes())
            .expect("type");
    }
    let r = util::finish(child, "tcpsplice-auth -H on a terminal", LIMIT);
    // What it wrote before it exited: read once the terminal is closed.
    let end = std::time::Instant::now() + Duration::from_secs(5);
    while !reading.is_finished() && std::time::Instant::now() < end {
        std::thread::sleep(Duration::from_millis(10));
    }
    (r, shown())
}

#[test]
fn hash_option_on_a_terminal_asks_twice_without_echo() {
    let (r, screen) = hash_on_a_terminal(PW, PW);
    r.expect_code(0);
    assert!(
        !screen.contains("s3cret"),
        "the password was echoed: {screen:?}"
    );
    assert!(screen.contains("Password again: "), "{screen:?}");
    let hash = String::from_utf8(r.stdout.clone()).unwrap();
    assert!(
        !hash.contains("Password"),
        "a prompt went to stdout: {hash:?}"
    );
    let users = write_users("hashtty", &format!("carol:{}", hash.trim()));
    login_http(&users, "carol", PW).expect_code(0);
    // Two different answers: no hash, a usage failure.
    let (r, screen) = hash_on_a_terminal(PW, "something else");
    r.expect_code(100);
    assert!(r.stdout.is_empty(), "{}", r.show());
    assert!(screen.contains("differ"), "{screen:?}");
}

#[test]
fn weak_and_unknown_hashes_are_refused_at_load() {
    let cases = [
        htpasswd(&["-m"], "u"),
        htpasswd(&["-d"], "u"),
        htpasswd(&["-s"], "u"),
        htpasswd(&["-B"], "u"),
        format!("u:{}", mkpasswd("md5crypt")),
        format!(
            "u:{}",
            util::tool("mkpasswd", &["-m", "sha-512", "-R", "1000", "-s"], PW)
        ),
        "u:plaintext".to_string(),
        "u:$argon2id$v=19$m=1024,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA".to_string(),
        "u:$7$C6..../....SodiumChloride$kBGj9fHznVYFQMEn/qDCfrDevf9YDtcDdKvEqHJLV8D".to_string(),
        "nohashfield".to_string(),
    ];
    for (i, bad) in cases.iter().enumerate() {
        let text = format!("# users\n\nok:{}\n{bad}\n", mkpasswd("sha-512"));
        let users = write_users(&format!("weak{i}"), &text);
        let (_, r) = over_pipes(
            auth_cmd(&["-f", users.to_str().unwrap()]),
            &http_connect("example.com:443", Some(("ok", PW))),
        );
        r.expect_code(100);
        let want = format!("{} line 4:", users.display());
        assert!(
            r.stderr_text().contains(&want),
            "for {bad:?}: no {want:?}{}",
            r.show()
        );
        assert!(env_line(&r).is_none(), "{}", r.show());
    }
}

/// Loads `text` as the users file and logs in as `ok` (whose hash is fine): the load
/// decides the exit code.
fn load_users(name: &str, text: &str) -> Ran {
    login_http(&write_users(name, text), "ok", PW)
}

#[test]
fn yescrypt_parameters_whose_memory_overflows_are_refused_at_load() {
    // N = 2^62 and more: 128·r·N wraps around, and each login (or, first in the file,
    // each unknown user) aborted the process.
    let ok = format!("ok:{}", mkpasswd("sha-512"));
    for (i, bad) in [
        "$y$jkB.$salt$hash",
        "$y$jk6lD$salt$hash",
        "$y$jjw9rD$salt$hash",
        "$y$.azaaAAa$salt$hash",
    ]
    .iter()
    .enumerate()
    {
        for (j, text) in [
            format!("{ok}\nalice:{bad}\n"),
            format!("alice:{bad}\n{ok}\n"),
        ]
        .iter()
        .enumerate()
        {
            let r = load_users(&format!("overflow{i}-{j}"), text);
            r.expect_code(100);
            let want = format!("line {}: user alice: yescrypt parameters", 2 - j);
            assert!(r.stderr_text().contains(&want), "no {want:?}{}", r.show());
            assert!(r.stderr_text().contains("memory"), "{}", r.show());
            assert!(env_line(&r).is_none(), "{}", r.show());
        }
    }
}

#[test]
fn hash_costs_over_the_ceilings_are_refused_at_load() {
    let ok = format!("ok:{}", mkpasswd("sha-512"));
    // Over 1 s a login (as estimated) or 256 MiB: refused, naming the line and why.
    let bcrypt = |cost: u32| format!("$2y${cost}${}", "a".repeat(53));
    for (i, (bad, why)) in [
        ("$y$j9T/kD$salt$hash".to_string(), "1.36 s"),
        ("$y$j9T/s4r$salt$hash".into(), "over the ceiling of 1 s"),
        ("$y$jET$salt$hash".into(), "512 MiB"),
        ("$y$jDT/0$salt$hash".into(), "over the ceiling of 1 s"),
        (bcrypt(15), "1.74 s"),
        (bcrypt(31), "over the ceiling of 1 s"),
        (
            "$argon2id$v=19$m=262144,t=4,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA".into(),
            "1.18 s",
        ),
        (
            "$argon2id$v=19$m=2097152,t=1,p=4$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA".into(),
            "2048 MiB",
        ),
        (
            "$6$rounds=5000000$salt$hash".into(),
            "over the ceiling of 1 s",
        ),
    ]
    .iter()
    .enumerate()
    {
        let r = load_users(&format!("costly{i}"), &format!("{ok}\n\nbob:{bad}\n"));
        r.expect_code(100);
        let want = "line 3: user bob: ";
        assert!(r.stderr_text().contains(want), "no {want:?}{}", r.show());
        assert!(
            r.stderr_text().contains(why),
            "for {bad}: no {why:?}{}",
            r.show()
        );
        assert!(env_line(&r).is_none(), "{}", r.show());
    }
    // The usual settings up to the ceilings load: mkpasswd up to -R 9, htpasswd -B up
    // to -C 14, argon2id as RFC 9106's second choice and at 256 MiB, sha-crypt as
    // passlib makes it.
    let argon = |m: &str, t: &str, p: &str| {
        util::tool(
            "argon2",
            &["tcpsplicesalt16", "-id", "-t", t, "-m", m, "-p", p, "-e"],
            PW,
        )
    };
    let text = format!(
        "{ok}\ny9:{}\nb14:{}\na64:{}\na256:{}\ns:{}\n",
        util::tool("mkpasswd", &["-m", "yescrypt", "-R", "9", "-s"], PW),
        bcrypt(14),
        argon("16", "3", "4"),
        argon("18", "3", "1"),
        util::tool("mkpasswd", &["-m", "sha-512", "-R", "656000", "-s"], PW),
    );
    let r = load_users("usual-costs", &text);
    r.expect_code(0);
    assert_eq!(
        env_line(&r).as_deref(),
        Some("example.com:443|ok|http|unset|unset|unset"),
        "{}",
        r.show()
    );
}

/// The fastest of two failed logins of `user`, each checked for exit 1.
fn fastest_failure(users: &std::path::Path, delay: &str, user: &str, pw: &str) -> Duration {
    // The fastest of three: the other tests running beside this one can only make a
    // login slower, and two tries were once not enough for that to pass.
    (0..3)
        .map(|_| {
            let (took, r) = timed_login(users, delay, user, pw);
            r.expect_code(1);
            took
        })
        .min()
        .unwrap()
}

/// carol (sha-512, 5000 rounds) first, then bob (bcrypt cost 12): 60 times carol's work.
fn mixed_users(name: &str) -> PathBuf {
    write_users(
        name,
        &format!(
            "carol:{}\n{}\n",
            mkpasswd("sha-512"),
            htpasswd(&["-B", "-C", "12"], "bob")
        ),
    )
}

#[test]
fn an_unknown_user_costs_what_the_costliest_hash_costs() {
    // Without a fail delay a refusal comes when the check ends: an unknown user's
    // password is checked against bob's bcrypt, not against carol's (the first line).
    let users = mixed_users("dummy");
    let bob = fastest_failure(&users, "0", "bob", "wrong");
    let carol = fastest_failure(&users, "0", "carol", "wrong");
    let unknown = fastest_failure(&users, "0", "mallory", "wrong");
    assert!(
        bob > carol * 4,
        "bcrypt 12 ({bob:?}) should cost far more than sha-crypt ({carol:?})"
    );
    assert!(
        unknown * 2 > bob,
        "an unknown user ({unknown:?}) costs less than bob's wrong password ({bob:?})"
    );
    // A fail delay shorter than a check cannot hide it: the log says so.
    let (_, r) = timed_login(&users, "0.05", "bob", "wrong");
    r.expect_code(1);
    assert!(
        r.stderr_text()
            .contains("longer than the fail delay of 50 ms"),
        "{}",
        r.show()
    );
    let (_, r) = timed_login(&users, "0.05", "carol", "wrong");
    assert!(!r.stderr_text().contains("fail delay"), "{}", r.show());
}

#[test]
fn every_failure_takes_the_fail_delay_whoever_the_user() {
    // The delay counts from the start of the check: bob's bcrypt and carol's sha-crypt
    // both fit in it, and so every refusal comes at the same time. A success does not
    // wait.
    let users = mixed_users("delay");
    let delay = Duration::from_millis(1500);
    let took: Vec<(&str, Duration)> = [("bob", "wrong"), ("carol", "wrong"), ("mallory", PW)]
        .iter()
        .map(|(u, pw)| (*u, fastest_failure(&users, "1.5", u, pw)))
        .collect();
    for (u, t) in &took {
        assert!(
            *t >= delay && *t < delay + Duration::from_millis(400),
            "{u}'s refusal took {t:?}, not the fail delay of {delay:?}: {took:?}"
        );
    }
    let (first, last) = (
        took.iter().map(|t| t.1).min().unwrap(),
        took.iter().map(|t| t.1).max().unwrap(),
    );
    assert!(
        last - first < Duration::from_millis(300),
        "refusals tell users apart: {took:?}"
    );
    let (t, r) = timed_login(&users, "1.5", "carol", PW);
    r.expect_code(0);
    assert!(t < Duration::from_secs(1), "a success waited {t:?}");
}

#[test]
fn per_user_rules_are_exported_and_checked() {
    let h = mkpasswd("sha-512");
    let users = write_users(
        "rules",
        &format!("alice:{h}:10.0.0.0/8, 192.0.2.1/32:443 [2001:db8::/32]:22\nbob:{h}:\n"),
    );
    let r = login_http(&users, "alice", PW);
    r.expect_code(0);
    assert_eq!(
        env_line(&r).as_deref(),
        Some(
            "example.com:443|alice|http|10.0.0.0/8 192.0.2.1/32:443 [2001:db8::/32]:22|unset|unset"
        )
    );
    let mut cmd = auth_cmd(&["-d", "0", "-f", users.to_str().unwrap()]);
    cmd.env("TCPSPLICE_RULES", "*")
        .env("TCPSPLICE_USER", "root");
    cmd.env("LISTEN_FDS", "1").env("LISTEN_PID", "1");
    let (_, r) = over_pipes(cmd, &http_connect("example.com:443", Some(("bob", PW))));
    r.expect_code(0);
    assert_eq!(
        env_line(&r).as_deref(),
        Some("example.com:443|bob|http|unset|unset|unset"),
        "inherited variables must not pass for ours{}",
        r.show()
    );
    std::fs::set_permissions(&users, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let r = login_http(&users, "alice", PW);
    r.expect_code(0);
    assert!(
        r.stderr_text().contains("readable by every user"),
        "{}",
        r.show()
    );
    std::fs::set_permissions(&users, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let r = login_http(&users, "alice", PW);
    assert!(
        !r.stderr_text().contains("readable by every user"),
        "{}",
        r.show()
    );
    let bad = write_users("badrule", &format!("\nalice:{h}:10.0.0.0/33\n"));
    let r = login_http(&bad, "alice", PW);
    r.expect_code(100);
    assert!(r.stderr_text().contains("line 2:"), "{}", r.show());
}

#[test]
fn inherited_user_is_removed_for_no_auth() {
    let mut cmd = auth_cmd(&["-n"]);
    cmd.env("TCPSPLICE_USER", "root").env("LISTEN_FDNAMES", "x");
    let (_, r) = over_pipes(
        cmd,
        &cat(&[b"\x05\x01\x00", &socks5_domain("h.example", 9)]),
    );
    r.expect_code(0);
    assert_eq!(
        env_line(&r).as_deref(),
        Some("h.example:9|unset|socks5|unset|unset|unset")
    );
}

#[test]
fn usage_errors() {
    let r = util::run(Command::new(AUTH).arg("cat"), LIMIT);
    r.expect_code(100);
    assert!(r.stderr_text().contains("usage"), "{}", r.show());
    let r = util::run(Command::new(AUTH).args(["-n"]), LIMIT);
    r.expect_code(100);
    let r = util::run(
        Command::new(AUTH).args(["-n", "-f", "/nonexistent/users", "cat"]),
        LIMIT,
    );
    r.expect_code(100);
    assert!(
        r.stderr_text().contains("/nonexistent/users"),
        "{}",
        r.show()
    );
    let r = util::run(
        Command::new(AUTH).args(["-n", "-p", "gopher", "cat"]),
        LIMIT,
    );
    r.expect_code(100);
    // The next program is missing: 127, after a successful handshake.
    let mut cmd = Command::new(AUTH);
    cmd.args(["-n", "/nonexistent/prog"])
        .env("TCPSPLICE_LOG", "stderr");
    let (_, r) = over_pipes(
        cmd,
        &cat(&[b"\x05\x01\x00", &socks5_domain("h.example", 9)]),
    );
    r.expect_code(127);
}

// ---------------------------------------------------------------- checkpassword

pub(super) fn checkpassword_script(name: &str, body: &str) -> PathBuf {
    let p = scratch(name).join("checkpassword");
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    let mut perm = std::fs::metadata(&p).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
    std::fs::set_permissions(&p, perm).unwrap();
    p
}

#[test]
fn checkpassword_delegation() {
    // Reads user and password from fd 3 as the interface says, then runs its argument.
    let cp = checkpassword_script(
        "cp",
        "tr '\\000' '\\n' <&3 | { read -r u; read -r p; read -r t; \
         [ \"$u\" = dave ] && [ \"$p\" = 's3cret pass:word' ] && [ -n \"$t\" ]; } || exit 1\n\
         exec \"$@\"",
    );
    let cp = cp.to_str().unwrap();
    let p = payload();
    let ok = cat(&[
        b"\x05\x01\x02",
        &socks5_userpass("dave", PW),
        &socks5_domain("example.net", 25),
        &p,
    ]);
    let (got, r) = over_socket(auth_cmd(&["-c", cp]), &ok);
    r.expect_code(0);
    expect_echo(&got, b"\x05\x02\x01\x00", &p, &r);
    assert_eq!(
        env_line(&r).as_deref(),
        Some("example.net:25|dave|socks5|unset|unset|127.0.0.1")
    );
    let bad = cat(&[
        b"\x05\x01\x02",
        &socks5_userpass("dave", "nope"),
        &socks5_domain("example.net", 25),
    ]);
    let (got, r) = over_socket(auth_cmd(&["-d", "0", "-c", cp]), &bad);
    r.expect_code(1);
    assert_eq!(got, b"\x05\x02\x01\x01", "{}", r.show());
    // A temporary failure of the checker is ours: 111, and a 503 for HTTP.
    let temp = checkpassword_script("cp111", "cat <&3 >/dev/null; exit 111");
    let (got, r) = over_socket(
        auth_cmd(&["-c", temp.to_str().unwrap()]),
        &http_connect("example.net:25", Some(("dave", PW))),
    );
    r.expect_code(111);
    assert!(got.starts_with(b"HTTP/1.1 503 "), "{}", r.show());
    // A checker that hangs is killed when its time is up.
    let slow = checkpassword_script("cpslow", "exec sleep 30");
    let (got, r) = over_socket(auth_cmd(&["-T", "0.5", "-c", slow.to_str().unwrap()]), &bad);
    r.expect_code(111);
    assert_eq!(got, b"\x05\x02\x01\x01", "{}", r.show());
    assert!(r.stderr_text().contains("did not answer"), "{}", r.show());
}

#[test]
fn a_checker_that_times_out_is_killed_with_everything_it_started() {
    // A shell checker whose sleep is a child of its own: killing only the shell would
    // leave the sleep behind, one per login attempt. The odd duration names it.
    let slow = checkpassword_script("cpgroup", "sleep 31.4159 & wait");
    let bad = cat(&[
        b"\x05\x01\x02",
        &socks5_userpass("dave", "nope"),
        &socks5_domain("example.net", 25),
    ]);
    let t = std::time::Instant::now();
    let (_, r) = over_socket(auth_cmd(&["-T", "0.5", "-c", slow.to_str().unwrap()]), &bad);
    r.expect_code(111);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "answered after {:?}",
        t.elapsed()
    );
    let left = || {
        std::fs::read_dir("/proc")
            .map(|d| {
                d.flatten()
                    .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
                    .filter(|c| c.windows(7).any(|w| w == b"31.4159"))
                    .count()
            })
            .unwrap_or(0)
    };
    // Killed processes may take a moment to leave the table.
    let end = std::time::Instant::now() + Duration::from_secs(5);
    while left() > 0 && std::time::Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(left(), 0, "the checker's sleep outlived it{}", r.show());
}

#[test]
fn over_long_or_nul_passwords_are_refused_without_a_check() {
    // A checker that leaves a mark when it is run at all.
    let dir = scratch("cpmark");
    let mark = dir.join("ran");
    let cp = checkpassword_script(
        "cpmark",
        &format!(
            "touch '{}'; cat <&3 >/dev/null; exec \"$@\"",
            mark.display()
        ),
    );
    let cp = cp.to_str().unwrap();
    // Over 4096 bytes, in an HTTP head made big enough to carry it.
    let long = "x".repeat(5000);
    let (got, r) = over_socket(
        auth_cmd(&["-d", "0", "-m", "64k", "-c", cp]),
        &http_connect("example.net:25", Some(("dave", &long))),
    );
    r.expect_code(1);
    assert!(got.starts_with(b"HTTP/1.1 407 "), "{}", r.show());
    // A NUL would shift the checker's fields: refused the same way.
    let nul = cat(&[
        b"\x05\x01\x02",
        &socks5_userpass("dave", "pw\0garbage"),
        &socks5_domain("example.net", 25),
    ]);
    let (got, r) = over_socket(auth_cmd(&["-d", "0", "-c", cp]), &nul);
    r.expect_code(1);
    assert_eq!(got, b"\x05\x02\x01\x01", "{}", r.show());
    assert!(!mark.exists(), "the checker ran");
    // And a normal password does reach it (the mark can appear).
    let ok = cat(&[
        b"\x05\x01\x02",
        &socks5_userpass("dave", PW),
        &socks5_domain("example.net", 25),
    ]);
    let (_, r) = over_socket(auth_cmd(&["-c", cp]), &ok);
    r.expect_code(0);
    assert!(mark.exists(), "the checker never ran{}", r.show());
}

#[test]
fn target_port_0_is_refused_by_socks5_and_socks4() {
    let cases: &[(&[u8], &[u8])] = &[
        (
            b"\x05\x01\x00\x05\x01\x00\x01\x08\x08\x08\x08\x00\x00",
            b"\x05\x00\x05\x01\x00\x01\x00\x00\x00\x00\x00\x00",
        ),
        (
            b"\x04\x01\x00\x00\x08\x08\x08\x08\x00",
            b"\x00\x5b\x00\x00\x00\x00\x00\x00",
        ),
    ];
    for (input, want) in cases {
        let (got, r) = over_socket(auth_cmd(&["-n"]), input);
        r.expect_code(1);
        assert_eq!(&got, want, "for input {input:02x?}{}", r.show());
        assert!(r.stderr_text().contains("target port 0"), "{}", r.show());
        assert!(env_line(&r).is_none(), "{}", r.show());
    }
}

// ---------------------------------------------------------------- the whole chain

const LISTEN: &str = env!("CARGO_BIN_EXE_tcpsplice-listen");
const DIAL: &str = env!("CARGO_BIN_EXE_tcpsplice-dial");
const SPLICE: &str = env!("CARGO_BIN_EXE_tcpsplice");

/// A target on loopback: answers `GET` with a 200 and a pattern body, echoes anything
/// else back. Runs until the test process ends.
pub(super) struct Target {
    pub(super) port: u16,
    pub(super) body: Vec<u8>,
}

impl Target {
    /// Checks that `r` (a client's run) ended well with the whole body on its stdout.
    pub(super) fn expect_body(&self, r: &Ran) {
        r.expect_code(0);
        assert_eq!(
            util::hash_of(&r.stdout),
            util::hash_of(&self.body),
            "{}",
            r.show()
        );
    }
}

pub(super) fn target() -> Target {
    let (l, a) = util::listener();
    let body = util::pattern(42, 256 * 1024);
    let b = body.clone();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let b = b.clone();
            std::thread::spawn(move || serve(s, &b));
        }
    });
    Target {
        port: a.port(),
        body,
    }
}

fn serve(mut s: TcpStream, body: &[u8]) {
    let _ = s.set_read_timeout(Some(LIMIT));
    let mut got = Vec::new();
    let mut buf = [0u8; 65536];
    while got.len() < 4 {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    if got.starts_with(b"GET ") {
        while !got.windows(4).any(|w| w == b"\r\n\r\n") && !got.windows(2).any(|w| w == b"\n\n") {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        let head = format!(
            "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let _ = s.write_all(head.as_bytes());
        let _ = s.write_all(body);
    } else {
        let _ = s.write_all(&got);
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
    }
    let _ = s.shutdown(std::net::Shutdown::Write);
}

/// tcpsplice-listen running the chain on an ephemeral port; killed when dropped.
struct Proxy {
    child: Option<std::process::Child>,
    port: u16,
    log: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl Proxy {
    fn start(auth_opts: &[&str], dial_rules: &[String]) -> Proxy {
        let mut cmd = Command::new(LISTEN);
        cmd.args(["-1", "127.0.0.1", "0", AUTH, "-d", "0.2"])
            .args(auth_opts)
            .arg(DIAL);
        for r in dial_rules {
            cmd.args(["-a", r]);
        }
        cmd.arg(SPLICE)
            .env("TCPSPLICE_LOG", "stderr")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn tcpsplice-listen");
        let mut err = child.stderr.take().expect("stderr");
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let l2 = log.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                l2.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        let mut out = child.stdout.take().expect("stdout");
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while out.read(&mut b).unwrap_or(0) == 1 && b[0] != b'\n' {
            line.push(b[0]);
        }
        let port = String::from_utf8_lossy(&line)
            .trim()
            .parse()
            .unwrap_or_else(|_| {
                let _ = child.kill();
                panic!(
                    "tcpsplice-listen printed no port: {:?}; log: {}",
                    String::from_utf8_lossy(&line),
                    String::from_utf8_lossy(&log.lock().unwrap())
                )
            });
        Proxy {
            child: Some(child),
            port,
            log,
        }
    }

    fn log(&self) -> String {
        String::from_utf8_lossy(&self.log.lock().unwrap()).into_owned()
    }

    /// The log once it holds `needle`, or as it is after LIMIT: the relay writes its end
    /// line after the client has seen the connection close, so a client's exit is no
    /// sign that the line is there.
    fn log_with(&self, needle: &str) -> String {
        let end = std::time::Instant::now() + LIMIT;
        loop {
            let log = self.log();
            if log.contains(needle) || std::time::Instant::now() > end {
                return log;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
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

fn client(cmd: &str, args: &[String], input: &[u8]) -> Ran {
    let mut c = Command::new(cmd);
    c.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd} is needed (scripts/deps/test.txt): {e}"));
    let mut stdin = child.stdin.take().expect("stdin");
    let input = input.to_vec();
    let w = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let r = util::finish(child, &format!("{c:?}"), LIMIT);
    let _ = w.join();
    r
}

/// curl through `proxy` (with `-p`, an HTTP proxy tunnels with CONNECT), bounded to 20 s.
pub(super) fn curl(tunnel: bool, proxy: &str, url: &str) -> Ran {
    let mut args = strings(&["-sS", "--max-time", "20"]);
    if tunnel {
        args.push("-p".into());
    }
    args.extend(strings(&["-x", proxy, url]));
    client("curl", &args, b"")
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// The body of an HTTP response (after the blank line).
fn http_body(out: &[u8]) -> &[u8] {
    match out.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(i) => &out[i + 4..],
        None => b"",
    }
}

fn chain_users(name: &str, t: &Target) -> PathBuf {
    let h = mkpasswd("sha-512");
    write_users(
        name,
        &format!(
            "alice:{h}\n# only port 1 of loopback: the target's port is refused\nlimited:{h}:127.0.0.1/32:1\ntarget:{h}:127.0.0.1/32:{}\n",
            t.port
        ),
    )
}

#[test]
fn chain_curl_socks5_socks5h_and_http_with_credentials() {
    let t = target();
    let users = chain_users("chain-curl", &t);
    let p = Proxy::start(
        &["-f", users.to_str().unwrap()],
        &[format!("127.0.0.1/32:{}", t.port)],
    );
    let pw = PW.replace(' ', "%20").replace(':', "%3A");
    for (proxy, url, user) in [
        (
            format!("socks5h://alice:{pw}@127.0.0.1:{}", p.port),
            format!("http://localhost:{}/", t.port),
            "alice",
        ),
        (
            format!("socks5://alice:{pw}@127.0.0.1:{}", p.port),
            format!("http://127.0.0.1:{}/", t.port),
            "alice",
        ),
        (
            format!("http://alice:{pw}@127.0.0.1:{}", p.port),
            format!("http://127.0.0.1:{}/", t.port),
            "alice",
        ),
        (
            format!("socks5h://target:{pw}@127.0.0.1:{}", p.port),
            format!("http://127.0.0.1:{}/", t.port),
            "target",
        ),
    ] {
        let r = curl(true, &proxy, &url);
        r.expect_code(0);
        assert_eq!(
            util::hash_of(&r.stdout),
            util::hash_of(&t.body),
            "body through {proxy}{}{}",
            r.show(),
            p.log()
        );
        let needle = format!("user={user} ");
        let log = p.log_with(&needle);
        assert!(log.contains(&needle), "{log}");
    }
    // A wrong password: curl reports the SOCKS5 rejection; HTTP gets 407.
    let r = curl(
        false,
        &format!("socks5h://alice:wrong@127.0.0.1:{}", p.port),
        &format!("http://localhost:{}/", t.port),
    );
    r.expect_code(97);
    assert!(
        r.stderr_text().contains("User was rejected"),
        "{}",
        r.show()
    );
    let r = curl(
        true,
        &format!("http://alice:wrong@127.0.0.1:{}", p.port),
        &format!("http://localhost:{}/", t.port),
    );
    r.expect_code(56);
    assert!(r.stderr_text().contains("407"), "{}", r.show());
    // SOCKS4a has no authentication: refused when credentials are required.
    let r = curl(
        false,
        &format!("socks4a://127.0.0.1:{}", p.port),
        &format!("http://localhost:{}/", t.port),
    );
    r.expect_code(97);
}

#[test]
fn chain_targets_refused_by_rules_get_the_right_codes() {
    let t = target();
    let users = chain_users("chain-rules", &t);
    let p = Proxy::start(
        &["-f", users.to_str().unwrap()],
        &[format!("127.0.0.1/32:{}", t.port)],
    );
    let mut req = cat(&[b"\x05\x01\x02", &socks5_userpass("limited", PW)]);
    req.extend_from_slice(b"\x05\x01\x00\x01\x7f\x00\x00\x01");
    req.extend_from_slice(&t.port.to_be_bytes());
    let c = TcpStream::connect(("127.0.0.1", p.port)).unwrap();
    let got = talk(c, &req);
    assert!(
        got.len() >= 6 && got[..4] == *b"\x05\x02\x01\x00" && got[4] == 5 && got[5] == 0x02,
        "user rules must refuse with REP 02: {got:02x?}{}",
        p.log()
    );
    // Not allowed by the dialer's -a: another loopback port.
    let (l, a) = util::listener();
    let mut req = cat(&[b"\x05\x01\x02", &socks5_userpass("alice", PW)]);
    req.extend_from_slice(b"\x05\x01\x00\x01\x7f\x00\x00\x01");
    req.extend_from_slice(&a.port().to_be_bytes());
    let c = TcpStream::connect(("127.0.0.1", p.port)).unwrap();
    let got = talk(c, &req);
    assert!(
        got.len() >= 6 && got[4] == 5 && got[5] == 0x02,
        "the dialer's rules must refuse with REP 02: {got:02x?}{}",
        p.log()
    );
    drop(l);
    let c = TcpStream::connect(("127.0.0.1", p.port)).unwrap();
    let got = talk(
        c,
        &http_connect(&format!("127.0.0.1:{}", a.port()), Some(("limited", PW))),
    );
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 403 "), "{text:?}{}", p.log());
}

#[test]
fn chain_pipelined_request_and_payload_in_one_write() {
    let t = target();
    let users = chain_users("chain-pipe", &t);
    let p = Proxy::start(
        &["-f", users.to_str().unwrap()],
        &[format!("127.0.0.1/32:{}", t.port)],
    );
    let payload = util::pattern(9, 1 << 20);
    // SOCKS5: greeting, credentials, request and 1 MiB of payload in one write.
    let mut req = cat(&[b"\x05\x01\x02", &socks5_userpass("alice", PW)]);
    req.extend_from_slice(b"\x05\x01\x00\x01\x7f\x00\x00\x01");
    req.extend_from_slice(&t.port.to_be_bytes());
    let c = TcpStream::connect(("127.0.0.1", p.port)).unwrap();
    let got = talk(c, &cat(&[&req, b"ECHO", &payload]));
    assert!(
        got.len() >= 14 && got[..4] == *b"\x05\x02\x01\x00" && got[4..6] == *b"\x05\x00",
        "{:02x?}{}",
        &got[..got.len().min(20)],
        p.log()
    );
    assert_eq!(
        util::hash_of(&got[14..]),
        util::hash_of(&cat(&[b"ECHO", &payload])),
        "{}",
        p.log()
    );
    // HTTP CONNECT: request head and payload in one write.
    let c = TcpStream::connect(("127.0.0.1", p.port)).unwrap();
    let head = http_connect(&format!("127.0.0.1:{}", t.port), Some(("alice", PW)));
    let got = talk(c, &cat(&[&head, b"ECHO", &payload]));
    let text = String::from_utf8_lossy(&got[..got.len().min(100)]).into_owned();
    assert!(text.starts_with("HTTP/1.1 200 "), "{text:?}{}", p.log());
    assert_eq!(
        util::hash_of(http_body(&got)),
        util::hash_of(&cat(&[b"ECHO", &payload])),
        "{}",
        p.log()
    );
}

#[test]
fn chain_netcat_ncat_and_curl_socks4a_clients() {
    let t = target();
    let users = chain_users("chain-nc", &t);
    let rules = [format!("127.0.0.1/32:{}", t.port)];
    let auth = Proxy::start(&["-f", users.to_str().unwrap()], &rules);
    let anon = Proxy::start(&["-n"], &rules);
    let get = b"GET / HTTP/1.0\r\n\r\n";
    let tp = t.port.to_string();
    let cases: Vec<(&str, Vec<String>)> = vec![
        (
            "nc",
            strings(&[
                "-X",
                "5",
                "-x",
                &format!("127.0.0.1:{}", anon.port),
                "localhost",
                &tp,
            ]),
        ),
        (
            "nc",
            strings(&[
                "-X",
                "4",
                "-x",
                &format!("127.0.0.1:{}", anon.port),
                "127.0.0.1",
                &tp,
            ]),
        ),
        (
            "nc",
            strings(&[
                "-X",
                "connect",
                "-x",
                &format!("127.0.0.1:{}", anon.port),
                "localhost",
                &tp,
            ]),
        ),
        (
            "ncat",
            strings(&[
                "--proxy",
                &format!("127.0.0.1:{}", auth.port),
                "--proxy-type",
                "socks5",
                "--proxy-auth",
                &format!("alice:{PW}"),
                "--proxy-dns",
                "remote",
                "localhost",
                &tp,
            ]),
        ),
        (
            "ncat",
            strings(&[
                "--proxy",
                &format!("127.0.0.1:{}", auth.port),
                "--proxy-type",
                "http",
                "--proxy-auth",
                &format!("alice:{PW}"),
                "localhost",
                &tp,
            ]),
        ),
    ];
    for (prog, args) in cases {
        let r = client(prog, &args, get);
        r.expect_code(0);
        assert_eq!(
            util::hash_of(http_body(&r.stdout)),
            util::hash_of(&t.body),
            "{}{}{}",
            r.show(),
            auth.log(),
            anon.log()
        );
    }
    let r = curl(
        false,
        &format!("socks4a://127.0.0.1:{}", anon.port),
        &format!("http://localhost:{}/", t.port),
    );
    t.expect_body(&r);
    // nc -P asks for the password on its terminal: give it one with script(1). It tries
    // without credentials first, gets 407, and comes back with Basic.
    let sh = format!(
        "(sleep 1; printf '%s\\n' '{PW}'; sleep 1; printf 'GET / HTTP/1.0\\n\\n'; sleep 3) | \
         script -qc 'nc -X connect -x 127.0.0.1:{} -P alice localhost {}' /dev/null",
        auth.port, t.port
    );
    let r = client("sh", &strings(&["-c", &sh]), b"");
    assert!(
        r.stdout.windows(15).any(|w| w == b"HTTP/1.0 200 OK"),
        "{}{}",
        r.show(),
        auth.log()
    );
    let log = auth.log_with("user=alice ");
    assert!(log.contains("user=alice "), "{log}");
}

/// The README's text for a supervisor, with the installed paths replaced by the built
/// programs and the test's users file, and the dialer allowed to reach the test target.
fn readme_snippet(t: &Target, users: &std::path::Path, text: &str) -> String {
    let rule = format!("{DIAL} -a 127.0.0.1/32:{}", t.port);
    let mut out = text.to_string();
    for (from, to) in [
        ("/usr/local/bin/tcpsplice-auth", AUTH),
        ("/usr/local/bin/tcpsplice-dial", "@DIAL@"),
        ("/usr/local/bin/tcpsplice", SPLICE),
        ("@DIAL@", &rule),
        ("/etc/tcpsplice/users", users.to_str().unwrap()),
    ] {
        assert!(out.contains(from), "README snippet has no {from:?}: {out}");
        out = out.replace(from, to);
    }
    out
}

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README.md")
}

/// curl through a supervisor on `port` until it listens; the body must arrive whole.
fn curl_until_listening(port: u16, t: &Target, child: &mut std::process::Child) {
    let mut result = None;
    for _ in 0..200 {
        let r = curl(
            false,
            &format!(
                "socks5h://alice:{}@127.0.0.1:{port}",
                PW.replace(' ', "%20")
            ),
            &format!("http://localhost:{}/", t.port),
        );
        if r.status.code() != Some(7) {
            result = Some(r);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    let r = result.expect("the supervisor never listened");
    t.expect_body(&r);
}

#[test]
fn readme_systemd_units_work() {
    // The ExecStart= of the README's unit, under systemd's helper for Accept=yes with
    // StandardInput=socket (--inetd).
    let t = target();
    let users = chain_users("readme-systemd", &t);
    let text = readme();
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("ExecStart=/usr/local/bin/tcpsplice-auth"))
        .expect("README has the service's ExecStart=");
    let exec = readme_snippet(&t, &users, line.trim_start_matches("ExecStart="));
    let port = util::listener().1.port();
    let mut child = Command::new("systemd-socket-activate")
        .args(["--inetd", "-a", "-l", &format!("127.0.0.1:{port}")])
        .args(["-E", "TCPSPLICE_LOG=stderr"])
        .args(exec.split_whitespace())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("systemd-socket-activate (package systemd) is needed");
    curl_until_listening(port, &t, &mut child);
}

#[test]
fn readme_xinetd_service_works() {
    let t = target();
    let users = chain_users("readme-xinetd", &t);
    let text = readme();
    let start = text
        .find("    service tcpsplice-proxy")
        .expect("README has the xinetd service");
    let end = start + text[start..].find("    }\n").expect("end of the service") + 6;
    let port = util::listener().1.port();
    let conf = readme_snippet(&t, &users, &text[start..end])
        .replace(
            "port        = 1080",
            &format!("port = {port}\n    env = TCPSPLICE_LOG=stderr"),
        )
        .replace("user        = tcpsplice", "user = root");
    let dir = scratch("readme-xinetd-conf");
    let path = dir.join("xinetd.conf");
    std::fs::write(&path, conf).unwrap();
    let mut child = Command::new("xinetd")
        .arg("-dontfork")
        .arg("-f")
        .arg(&path)
        .arg("-filelog")
        .arg(dir.join("log"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("xinetd is needed (scripts/deps/test.txt)");
    curl_until_listening(port, &t, &mut child);
}

#[test]
fn no_auth_and_users_together() {
    // With -n and -f, credentials are used when given (so the user's name and rules
    // apply), and clients without any are let through anonymously.
    let users = sha512_users("both");
    let f = users.to_str().unwrap();
    let (_, r) = over_pipes(
        auth_cmd(&["-n", "-f", f]),
        &http_connect("example.com:443", None),
    );
    r.expect_code(0);
    assert_eq!(
        env_line(&r).as_deref(),
        Some("example.com:443|unset|http|unset|unset|unset")
    );
    let (_, r) = over_pipes(
        auth_cmd(&["-n", "-f", f]),
        &http_connect("example.com:443", Some(("alice", PW))),
    );
    r.expect_code(0);
    assert_eq!(
        env_line(&r).as_deref(),
        Some("example.com:443|alice|http|unset|unset|unset")
    );
    // Wrong credentials are not turned into no-auth.
    let (got, r) = over_pipes(
        auth_cmd(&["-d", "0", "-n", "-f", f]),
        &http_connect("example.com:443", Some(("alice", "x"))),
    );
    r.expect_code(1);
    assert!(got.starts_with(b"HTTP/1.1 407 "), "{}", r.show());
    let input = cat(&[
        b"\x05\x02\x00\x02",
        &socks5_userpass("alice", PW),
        &socks5_domain("example.com", 80),
    ]);
    let (got, r) = over_pipes(auth_cmd(&["-n", "-f", f]), &input);
    r.expect_code(0);
    assert_eq!(got, b"\x05\x02\x01\x00", "{}", r.show());
    assert_eq!(
        env_line(&r).as_deref(),
        Some("example.com:80|alice|socks5|unset|unset|unset")
    );
}

#[test]
fn man_page_documents_every_option() {
    let r = util::run(Command::new(AUTH).arg("-h"), LIMIT);
    r.expect_code(0);
    let usage = String::from_utf8_lossy(&r.stdout).into_owned();
    let man = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/man/tcpsplice-auth.1"))
        .expect("man page");
    let mut seen = 0;
    for word in usage.split(|c: char| c.is_whitespace() || c == '[' || c == ']') {
        let Some(letter) = word.strip_prefix('-').filter(|l| l.len() == 1) else {
            continue;
        };
        seen += 1;
        assert!(
            man.contains(&format!(".BI \\-{letter} "))
                || man.contains(&format!(".B \\-{letter}\n")),
            "-{letter} is in the usage but has no entry in the man page"
        );
    }
    assert!(seen >= 9, "usage lists too few options: {usage}");
}
