//! The PROXY protocol header tcpsplice-listen -P and tcpsplice-proxy receive
//! (`proxy::header::parse`, and its `Reader` on a socketpair or a pipe), against a
//! reference reading of haproxy's proxy-protocol.txt written here.
//!
//! Input: a control byte (bit 7: a pipe rather than a socketpair; bits 0-6: the size of
//! the pieces the bytes arrive in, 0 for all at once), then what a balancer sends: a
//! header, or not, and whatever follows it.
//!
//! Checked: `parse` finds a whole header exactly when the reference does, with the
//! same client and local addresses (or the balancer's own connection) and the same
//! length, at most 2064 bytes; each shorter prefix of a header asks for more, and never
//! for a byte past the header's end; a refusal stays a refusal whatever follows, and
//! what asks for more is never whole sooner than it said. The `Reader`, fed the bytes
//! in pieces, takes exactly the header off the connection: what is left to read is
//! byte for byte what followed it; it fails only where `parse` refuses or the stream
//! ended first, and it waits only where more is needed.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use tcpsplice::proxy::header::{parse, Header, Parse, Reader, Step, MAX};

use crate::handshake::{check, cvt, pipe, socket_pair, write_all};
use crate::proxy::{decimal, dotted_quad};

const SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// The reference: the header at the start of `b`, whole and valid, and its length.
fn reference(b: &[u8]) -> Option<(Header, usize)> {
    if b.starts_with(b"PROXY ") {
        // The line ends at its first LF, which must close a CRLF within 107 bytes.
        let lf = b.iter().position(|&c| c == b'\n')?;
        if lf + 1 > 107 || lf < 7 || b[lf - 1] != b'\r' {
            return None;
        }
        let line = &b[6..lf - 1];
        if !line.iter().all(|&c| (0x20..0x7f).contains(&c)) {
            return None;
        }
        let line = std::str::from_utf8(line).ok()?;
        if line == "UNKNOWN" || line.starts_with("UNKNOWN ") {
            return Some((Header::Local, lf + 1));
        }
        let f: Vec<&str> = line.split(' ').collect();
        let [proto, s, d, sp, dp] = f[..] else {
            return None;
        };
        let (sp, dp) = (decimal(sp, 65535)? as u16, decimal(dp, 65535)? as u16);
        let (s, d) = match proto {
            "TCP4" => (IpAddr::V4(dotted_quad(s)?), IpAddr::V4(dotted_quad(d)?)),
            // A colon marks IPv6 text; an IPv4 literal is not one.
            "TCP6" if s.contains(':') && d.contains(':') => (
                IpAddr::V6(s.parse::<Ipv6Addr>().ok()?),
                IpAddr::V6(d.parse::<Ipv6Addr>().ok()?),
            ),
            _ => return None,
        };
        let h = Header::Proxied {
            client: SocketAddr::new(s, sp),
            local: SocketAddr::new(d, dp),
        };
        return Some((h, lf + 1));
    }
    if b.starts_with(SIGNATURE) && b.len() >= 16 {
        let len = usize::from(u16::from_be_bytes([b[14], b[15]]));
        if b[12] >> 4 != 2 || b[12] & 15 > 1 || len > 2048 || b.len() < 16 + len {
            return None;
        }
        let a = &b[16..16 + len];
        let h = match (b[12] & 15, b[13] >> 4, b[13] & 15) {
            (0, _, _) | (1, 0, _) => Header::Local,
            (1, 1, 1) if len >= 12 => {
                let ip = |i: usize| IpAddr::V4(Ipv4Addr::new(a[i], a[i + 1], a[i + 2], a[i + 3]));
                let port = |i: usize| u16::from_be_bytes([a[i], a[i + 1]]);
                Header::Proxied {
                    client: SocketAddr::new(ip(0), port(8)),
                    local: SocketAddr::new(ip(4), port(10)),
                }
            }
            (1, 2, 1) if len >= 36 => {
                let ip = |i: usize| {
                    let mut o = [0u8; 16];
                    o.copy_from_slice(&a[i..i + 16]);
                    IpAddr::V6(Ipv6Addr::from(o))
                };
                let port = |i: usize| u16::from_be_bytes([a[i], a[i + 1]]);
                Header::Proxied {
                    client: SocketAddr::new(ip(0), port(32)),
                    local: SocketAddr::new(ip(16), port(34)),
                }
            }
            _ => return None,
        };
        return Some((h, 16 + len));
    }
    None
}

pub fn run(data: &[u8]) {
    let Some((&control, bytes)) = data.split_first() else {
        return;
    };
    let got = parse(bytes);
    let want = reference(bytes);
    match (got, want) {
        (Parse::Done(h, n), Some((rh, rn))) => {
            assert_eq!((h, n), (rh, rn), "parse and the reference differ");
            assert!(n <= MAX, "a header of {n} bytes");
            // Its own bytes suffice; each shorter prefix asks for more, never past it.
            assert_eq!(parse(&bytes[..n]), Parse::Done(h, n));
            for k in 0..n {
                match parse(&bytes[..k]) {
                    Parse::More(m) => assert!(m >= 1 && k + m <= n, "prefix {k} asks {m} of {n}"),
                    other => panic!("prefix {k} of a {n}-byte header: {other:?}"),
                }
            }
        }
        (Parse::Done(h, n), None) => panic!("parse took {h:?} ({n} bytes) the reference refuses"),
        (Parse::Bad(why), Some(r)) => {
            panic!("parse refused ({why}) what the reference reads: {r:?}")
        }
        (Parse::More(m), Some(r)) => {
            panic!("parse asks for {m} more where the reference read {r:?}")
        }
        (Parse::Bad(why), None) => {
            // Final: nothing that follows makes it a header.
            for tail in [&b"\r\n"[..], &[0u8; 64], b" 1 2\r\n"] {
                let longer = [bytes, tail].concat();
                assert!(
                    matches!(parse(&longer), Parse::Bad(_)),
                    "refused ({why}), then not with {tail:?} after it"
                );
            }
        }
        (Parse::More(m), None) => {
            assert!(
                m >= 1 && bytes.len() + m <= MAX,
                "asks for {m} after {}",
                bytes.len()
            );
            // Nothing shorter than what it asked for makes it whole.
            let fill = [bytes, &vec![b'\n'; m - 1]].concat();
            assert!(
                !matches!(parse(&fill), Parse::Done(..)),
                "asked for {m} more, whole with {}",
                m - 1
            );
        }
    }
    read_off(control, bytes, got);
}

/// Feeds `bytes` to a `Reader` in pieces over a socketpair or a pipe, and checks what
/// it took and what it left.
fn read_off(control: u8, bytes: &[u8], parsed: Parse) {
    // Within what a socketpair's or a pipe's buffer holds unread.
    let bytes = &bytes[..bytes.len().min(32 * 1024)];
    let parsed = if bytes.len() < 32 * 1024 {
        parsed
    } else {
        parse(bytes)
    };
    let socket = control & 0x80 == 0;
    let piece = match usize::from(control & 0x7f) {
        0 => bytes.len().max(1),
        n => n,
    };
    let (rd, wr) = wires(socket);
    let mut wr = Some(wr);
    let mut reader = Reader::new();
    let mut sent = 0;
    let step = loop {
        if sent < bytes.len() {
            let end = (sent + piece).min(bytes.len());
            write_all(wr.as_ref().map_or(-1, |w| w.as_raw_fd()), &bytes[sent..end]);
            sent = end;
        } else if wr.is_some() {
            // All of it is there: a reader still waiting must need more than there is.
            drop(wr.take());
        }
        // A pipe gives one read per step; step while there is something to read.
        let mut s = reader.step(rd.as_raw_fd(), socket);
        while s == Step::Wait && readable(rd.as_raw_fd()) {
            s = reader.step(rd.as_raw_fd(), socket);
        }
        match s {
            Step::Wait if sent < bytes.len() || wr.is_some() => {
                assert!(
                    wr.is_none() || sent < bytes.len() || matches!(parsed, Parse::More(_)),
                    "waits with all {} bytes there: parse says {parsed:?}",
                    bytes.len()
                );
                continue;
            }
            Step::Wait => panic!("waits after the end of the stream"),
            other => break other,
        }
    };
    match (step, parsed) {
        (Step::Done(h), Parse::Done(ph, n)) => {
            assert_eq!(h, ph);
            assert_eq!(
                reader.taken(),
                n,
                "took {} of a {n}-byte header",
                reader.taken()
            );
            // What the next program finds: every byte after the header, none of it.
            if let Some(w) = wr.take() {
                let end = bytes.len();
                write_all(w.as_raw_fd(), &bytes[sent..end]);
            }
            assert_eq!(
                read_to_end(rd.as_raw_fd()),
                &bytes[n..],
                "left after the header"
            );
        }
        (Step::Done(h), p) => panic!("the reader took {h:?} where parse says {p:?}"),
        (Step::Fail(_), Parse::Bad(_)) => {}
        // The stream ended before the header was whole.
        (Step::Fail(why), Parse::More(_)) => assert!(why.contains("closed"), "{why}"),
        (Step::Fail(why), p) => panic!("the reader failed ({why}) where parse says {p:?}"),
        (Step::Wait, _) => unreachable!(),
    }
}

/// (the reader's end, the balancer's end): a socketpair, or a pipe that does not block
/// (the reader takes the socket with MSG_DONTWAIT); either holds 32 KiB unread.
fn wires(socket: bool) -> (OwnedFd, OwnedFd) {
    if socket {
        return socket_pair();
    }
    let (r, w) = pipe();
    for end in [&r, &w] {
        check(
            tcpsplice::sys::set_nonblocking(end.as_raw_fd(), true),
            "make the pipe non-blocking",
        );
    }
    (r, w)
}

/// Whether something (bytes or the end) can be read on `fd` right now.
fn readable(fd: RawFd) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll reads and writes the one pollfd we own.
    cvt(unsafe { libc::poll(&mut p, 1, 0) }, "poll") == 1
}

fn read_to_end(fd: RawFd) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        // SAFETY: reads into memory we own, at most buf.len() bytes.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return out,
                _ => check::<()>(Err(e), "read"),
            }
        }
        match n {
            0 => return out,
            n => out.extend_from_slice(&buf[..n as usize]),
        }
    }
}
