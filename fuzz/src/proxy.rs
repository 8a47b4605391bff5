//! The PROXY protocol header tcpsplice-dial sends (`dial::proxyproto::{v1, v2}`), and
//! the `ip:port` parser that reads the client's and local addresses from the
//! environment (`proxyproto::parse_addr`), against a reference parser of haproxy's
//! proxy-protocol.txt written here.
//!
//! Input: the two ends (none, IPv4, IPv6 with any flow label and scope, IPv4-mapped),
//! then a raw `ip:port` text for `parse_addr`.
//!
//! Checked: each end, written into the environment as tcpsplice writes it
//! (`join_host_port`, and unbracketed IPv6), reads back as itself; the reference parser
//! reads both headers and gets back the same addresses and ports, as both IPv4 when
//! both are IPv4 (mapped counts as IPv4) and otherwise both IPv6, or UNKNOWN / LOCAL
//! when an end is missing; the v1 line is at most 107 printable bytes and one CRLF, the
//! v2 header's length field covers exactly the addresses. A raw text `parse_addr` takes
//! reads back as the same address, and makes headers that read back too.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};

use tcpsplice::conninfo::join_host_port;
use tcpsplice::dial::proxyproto::{parse_addr, v1, v2};

use crate::bytes::Bytes;

const SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// What a header says.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Header {
    /// v1 `PROXY UNKNOWN`, v2 LOCAL: no addresses.
    Unknown,
    Tcp4(Ipv4Addr, Ipv4Addr, u16, u16),
    Tcp6(Ipv6Addr, Ipv6Addr, u16, u16),
}

fn gen_end(r: &mut Bytes) -> Option<SocketAddr> {
    let port = r.u16();
    let v4 = |r: &mut Bytes| Ipv4Addr::from(r.u32());
    let v6 = |a: Ipv6Addr, r: &mut Bytes| {
        let (flow, scope) = if r.bool() { (r.u32(), r.u32()) } else { (0, 0) };
        Some(SocketAddr::V6(SocketAddrV6::new(a, port, flow, scope)))
    };
    match r.below(6) {
        0 => None,
        1 => Some(SocketAddr::new(IpAddr::V4(v4(r)), port)),
        2 => v6(Ipv6Addr::from(r.u128()), r),
        3 => {
            let a = v4(r);
            v6(a.to_ipv6_mapped(), r)
        }
        4 => {
            let a = [Ipv6Addr::UNSPECIFIED, Ipv6Addr::LOCALHOST][r.below(2)];
            v6(a, r)
        }
        _ => Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port)),
    }
}

/// A mapped address as the IPv4 address it carries (written here).
fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(a) => match a.octets() {
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a, b, c, d] => {
                IpAddr::V4(Ipv4Addr::new(a, b, c, d))
            }
            _ => ip,
        },
        ip => ip,
    }
}

fn as_v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(a) => {
            let [a, b, c, d] = a.octets();
            Ipv6Addr::from([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a, b, c, d])
        }
        IpAddr::V6(a) => a,
    }
}

fn expected(src: Option<SocketAddr>, dst: Option<SocketAddr>) -> Header {
    let (Some(s), Some(d)) = (src, dst) else {
        return Header::Unknown;
    };
    match (unmap(s.ip()), unmap(d.ip())) {
        (IpAddr::V4(a), IpAddr::V4(b)) => Header::Tcp4(a, b, s.port(), d.port()),
        (a, b) => Header::Tcp6(as_v6(a), as_v6(b), s.port(), d.port()),
    }
}

/// A decimal number without leading zeros, at most `max`.
fn decimal(s: &str, max: u32) -> Option<u32> {
    let ok = !s.is_empty()
        && s.len() <= 5
        && s.bytes().all(|b| b.is_ascii_digit())
        && (s == "0" || !s.starts_with('0'));
    ok.then(|| s.parse().ok()).flatten().filter(|&n| n <= max)
}

fn dotted_quad(s: &str) -> Option<Ipv4Addr> {
    let parts: Vec<&str> = s.split('.').collect();
    if parts.len() != 4 {
        return None;
    }
    let mut o = [0u8; 4];
    for (i, p) in parts.iter().enumerate() {
        if p.len() > 3 {
            return None;
        }
        o[i] = decimal(p, 255)? as u8;
    }
    Some(Ipv4Addr::from(o))
}

/// Reads a version 1 header: `PROXY TCP4|TCP6 src dst sport dport\r\n` or `PROXY
/// UNKNOWN...\r\n`, at most 107 bytes.
fn read_v1(h: &[u8]) -> Result<Header, String> {
    if h.len() > 107 {
        return Err(format!("{} bytes, over 107", h.len()));
    }
    let line = h.strip_suffix(b"\r\n").ok_or("no CRLF at the end")?;
    if !line.iter().all(|&b| (0x20..0x7f).contains(&b)) {
        return Err("a byte that is not printable ASCII".into());
    }
    let line = std::str::from_utf8(line).unwrap();
    let rest = line.strip_prefix("PROXY ").ok_or("no PROXY")?;
    if rest == "UNKNOWN" || rest.starts_with("UNKNOWN ") {
        return Ok(Header::Unknown);
    }
    let f: Vec<&str> = rest.split(' ').collect();
    let [proto, s, d, sp, dp] = f[..] else {
        return Err(format!("{} fields", f.len()));
    };
    let port = |p: &str| {
        decimal(p, 65535)
            .map(|n| n as u16)
            .ok_or(format!("port {p:?}"))
    };
    let (sp, dp) = (port(sp)?, port(dp)?);
    match proto {
        "TCP4" => Ok(Header::Tcp4(
            dotted_quad(s).ok_or("source address")?,
            dotted_quad(d).ok_or("destination address")?,
            sp,
            dp,
        )),
        "TCP6" => {
            let v6 = |a: &str| {
                let ok = a
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.');
                ok.then(|| a.parse::<Ipv6Addr>().ok()).flatten()
            };
            Ok(Header::Tcp6(
                v6(s).ok_or("source address")?,
                v6(d).ok_or("destination address")?,
                sp,
                dp,
            ))
        }
        p => Err(format!("protocol {p:?}")),
    }
}

/// Reads a version 2 header, which must be all of `h`.
fn read_v2(h: &[u8]) -> Result<Header, String> {
    if h.len() < 16 || &h[..12] != SIGNATURE {
        return Err("no signature".into());
    }
    let (ver_cmd, fam) = (h[12], h[13]);
    let len = usize::from(u16::from_be_bytes([h[14], h[15]]));
    if h.len() != 16 + len {
        return Err(format!("length field {len}, {} bytes follow", h.len() - 16));
    }
    let body = &h[16..];
    let port = |at: usize| u16::from_be_bytes([body[at], body[at + 1]]);
    match (ver_cmd, fam) {
        (0x20, 0x00) if len == 0 => Ok(Header::Unknown),
        (0x21, 0x11) if len == 12 => Ok(Header::Tcp4(
            Ipv4Addr::from(<[u8; 4]>::try_from(&body[..4]).unwrap()),
            Ipv4Addr::from(<[u8; 4]>::try_from(&body[4..8]).unwrap()),
            port(8),
            port(10),
        )),
        (0x21, 0x21) if len == 36 => Ok(Header::Tcp6(
            Ipv6Addr::from(<[u8; 16]>::try_from(&body[..16]).unwrap()),
            Ipv6Addr::from(<[u8; 16]>::try_from(&body[16..32]).unwrap()),
            port(32),
            port(34),
        )),
        _ => Err(format!(
            "version/command 0x{ver_cmd:02x}, family 0x{fam:02x}, length {len}"
        )),
    }
}

fn check_headers(src: Option<SocketAddr>, dst: Option<SocketAddr>) {
    let want = expected(src, dst);
    let h1 = v1(src, dst);
    assert_eq!(
        read_v1(&h1),
        Ok(want.clone()),
        "v1 for {src:?} {dst:?}: {:?}",
        String::from_utf8_lossy(&h1)
    );
    let h2 = v2(src, dst);
    assert_eq!(read_v2(&h2), Ok(want), "v2 for {src:?} {dst:?}: {h2:02x?}");
}

/// An end written into the environment as tcpsplice writes it reads back as itself.
fn check_env(a: SocketAddr) {
    let plain = SocketAddr::new(a.ip(), a.port());
    let text = join_host_port(&a.ip().to_string(), &a.port().to_string());
    assert_eq!(parse_addr(&text), Some(plain), "{text:?}");
    if a.is_ipv6() {
        let text = format!("{}:{}", a.ip(), a.port());
        assert_eq!(parse_addr(&text), Some(plain), "{text:?}");
    }
}

pub fn run(data: &[u8]) {
    let mut r = Bytes::new(data);
    let src = gen_end(&mut r);
    let dst = gen_end(&mut r);
    for a in [src, dst].into_iter().flatten() {
        check_env(a);
    }
    check_headers(src, dst);

    let raw = String::from_utf8_lossy(r.rest()).into_owned();
    if let Some(a) = parse_addr(&raw) {
        check_env(a);
        check_headers(Some(a), dst.or(Some(a)));
        check_headers(src.or(Some(a)), Some(a));
    }
}
