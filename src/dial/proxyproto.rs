//! The PROXY protocol header (haproxy's doc/proxy-protocol.txt), versions 1 and 2, that
//! tcpsplice-dial can send to the target first so that it learns who the client is.
//! Source = the client, destination = the address the client connected to.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use crate::rules::canonical;

const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Both ends in one family: IPv4 when both are IPv4 (mapped addresses count as IPv4),
/// else both as IPv6, mapping an IPv4 end, as haproxy does for mixed families.
fn same_family(src: SocketAddr, dst: SocketAddr) -> (SocketAddr, SocketAddr) {
    let (s, d) = (canonical(src.ip()), canonical(dst.ip()));
    let v6 = |ip: IpAddr| match ip {
        IpAddr::V4(a) => IpAddr::V6(a.to_ipv6_mapped()),
        v6 => v6,
    };
    if s.is_ipv4() && d.is_ipv4() {
        (
            SocketAddr::new(s, src.port()),
            SocketAddr::new(d, dst.port()),
        )
    } else {
        (
            SocketAddr::new(v6(s), src.port()),
            SocketAddr::new(v6(d), dst.port()),
        )
    }
}

/// A version 1 header: `PROXY TCP4 src dst sport dport\r\n`, or `PROXY UNKNOWN\r\n` when
/// either end is not known (a shell pipeline has no client address).
pub fn v1(src: Option<SocketAddr>, dst: Option<SocketAddr>) -> Vec<u8> {
    let (Some(src), Some(dst)) = (src, dst) else {
        return b"PROXY UNKNOWN\r\n".to_vec();
    };
    let (s, d) = same_family(src, dst);
    let proto = if s.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {proto} {} {} {} {}\r\n",
        s.ip(),
        d.ip(),
        s.port(),
        d.port()
    )
    .into_bytes()
}

/// A version 2 header: PROXY command over TCP4 or TCP6, or the LOCAL command with no
/// address when either end is not known.
pub fn v2(src: Option<SocketAddr>, dst: Option<SocketAddr>) -> Vec<u8> {
    let mut v = V2_SIGNATURE.to_vec();
    let (Some(src), Some(dst)) = (src, dst) else {
        v.extend_from_slice(&[0x20, 0x00, 0, 0]);
        return v;
    };
    let (s, d) = same_family(src, dst);
    let octets = |ip: IpAddr| match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    let (fam, len): (u8, u16) = if s.is_ipv4() { (0x11, 12) } else { (0x21, 36) };
    v.extend_from_slice(&[0x21, fam]);
    v.extend_from_slice(&len.to_be_bytes());
    v.extend_from_slice(&octets(s.ip()));
    v.extend_from_slice(&octets(d.ip()));
    v.extend_from_slice(&s.port().to_be_bytes());
    v.extend_from_slice(&d.port().to_be_bytes());
    v
}

/// Parses `ip:port` or `[ip]:port` as the environment carries them.
pub fn parse_addr(s: &str) -> Option<SocketAddr> {
    s.parse::<SocketAddr>().ok().or_else(|| {
        // An unbracketed IPv6 address with a port, as some programs write it.
        let (ip, port) = s.rsplit_once(':')?;
        let ip: Ipv6Addr = ip.parse().ok()?;
        Some(SocketAddr::new(IpAddr::V6(ip), port.parse().ok()?))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> Option<SocketAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn headers() {
        assert_eq!(
            v1(sa("192.0.2.1:56324"), sa("127.0.0.1:443")),
            b"PROXY TCP4 192.0.2.1 127.0.0.1 56324 443\r\n"
        );
        assert_eq!(
            v1(sa("[::ffff:192.0.2.1]:5"), sa("127.0.0.1:6")),
            b"PROXY TCP4 192.0.2.1 127.0.0.1 5 6\r\n"
        );
        assert_eq!(
            v1(sa("[2001:db8::1]:5"), sa("127.0.0.1:6")),
            b"PROXY TCP6 2001:db8::1 ::ffff:127.0.0.1 5 6\r\n"
        );
        assert_eq!(v1(None, sa("127.0.0.1:6")), b"PROXY UNKNOWN\r\n");
        // The header haproxy's send-proxy-v2 was observed to send.
        let mut want = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        want.extend_from_slice(&[0x21, 0x11, 0, 12, 127, 0, 0, 1, 127, 0, 0, 1, 0xc7, 0xa0]);
        want.extend_from_slice(&[0x23, 0x8d]);
        assert_eq!(v2(sa("127.0.0.1:51104"), sa("127.0.0.1:9101")), want);
        let h6 = v2(sa("[::1]:1"), sa("[::1]:2"));
        assert_eq!(h6.len(), 16 + 36);
        assert_eq!(&h6[12..16], &[0x21, 0x21, 0, 36]);
        assert_eq!(&v2(None, None)[12..], &[0x20, 0, 0, 0]);
        assert_eq!(parse_addr("[::1]:5"), sa("[::1]:5"));
        assert_eq!(parse_addr("::1:5"), sa("[::1]:5"));
        assert_eq!(parse_addr("1.2.3.4:5"), sa("1.2.3.4:5"));
        assert_eq!(parse_addr("x"), None);
    }
}
