//! The header of every datagram between a SOCKS5 client and its UDP relay (RFC 1928,
//! section 7):
//!
//! ```text
//! RSV(2) FRAG(1) ATYP(1) DST.ADDR DST.PORT(2) DATA
//! ```
//!
//! ATYP 01 is a 4-byte IPv4 address, 04 a 16-byte IPv6 address, 03 a length byte and a
//! name. [`parse`] is a pure function over the datagram's bytes, as it reads network
//! input: it says where the destination is and where the payload starts, and decides
//! nothing else (the relay drops fragments and port 0). [`encode`] writes the header of
//! a reply, always with an IP address.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

/// Where a client's datagram is to go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dest<'a> {
    Ip(SocketAddr),
    /// A host name (ATYP 03): letters, digits, `-`, `.` and `_`, 1 to 255 bytes.
    Name(&'a str, u16),
}

/// A parsed header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header<'a> {
    /// FRAG: 0 for a whole datagram, else the position of a fragment.
    pub frag: u8,
    pub dest: Dest<'a>,
}

/// Why a datagram has no usable header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// It ends inside the header.
    Short,
    /// An ATYP other than 01, 03, 04.
    AddressType(u8),
    /// ATYP 03 with an empty name or bytes a host name cannot hold.
    BadName,
}

/// The longest header [`encode`] writes (IPv6).
pub const MAX_IP_HEADER: usize = 4 + 16 + 2;

/// Parses the header at the start of `d`: the header and the offset of the payload.
pub fn parse(d: &[u8]) -> Result<(Header<'_>, usize), Error> {
    let (&frag, rest) = d
        .get(2..)
        .and_then(|r| r.split_first())
        .ok_or(Error::Short)?;
    let (&atyp, rest) = rest.split_first().ok_or(Error::Short)?;
    let (addr_len, skip) = match atyp {
        0x01 => (4, 0),
        0x04 => (16, 0),
        0x03 => (usize::from(*rest.first().ok_or(Error::Short)?), 1),
        other => return Err(Error::AddressType(other)),
    };
    let end = 4 + skip + addr_len + 2;
    if d.len() < end {
        return Err(Error::Short);
    }
    let addr = &d[4 + skip..4 + skip + addr_len];
    let port = u16::from_be_bytes([d[end - 2], d[end - 1]]);
    let dest = match atyp {
        0x01 => {
            let a: [u8; 4] = addr.try_into().map_err(|_| Error::Short)?;
            Dest::Ip(SocketAddr::new(Ipv4Addr::from(a).into(), port))
        }
        0x04 => {
            let a: [u8; 16] = addr.try_into().map_err(|_| Error::Short)?;
            Dest::Ip(SocketAddr::new(Ipv6Addr::from(a).into(), port))
        }
        _ => {
            let ok = !addr.is_empty()
                && addr
                    .iter()
                    .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
            let name = std::str::from_utf8(addr).map_err(|_| Error::BadName)?;
            if !ok {
                return Err(Error::BadName);
            }
            Dest::Name(name, port)
        }
    };
    Ok((Header { frag, dest }, end))
}

/// The header of a datagram from `from` to the client: `00 00 00`, ATYP 01 or 04, the
/// address and the port. An IPv4-mapped IPv6 source is written as IPv4. Returns the
/// bytes and how many of them are the header.
pub fn encode(from: SocketAddr) -> ([u8; MAX_IP_HEADER], usize) {
    let mut h = [0u8; MAX_IP_HEADER];
    let port = from.port().to_be_bytes();
    let n = match crate::rules::canonical(from.ip()) {
        std::net::IpAddr::V4(a) => {
            h[3] = 0x01;
            h[4..8].copy_from_slice(&a.octets());
            8
        }
        std::net::IpAddr::V6(a) => {
            h[3] = 0x04;
            h[4..20].copy_from_slice(&a.octets());
            20
        }
    };
    h[n..n + 2].copy_from_slice(&port);
    (h, n + 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_every_address_type() {
        let d = b"\x00\x00\x00\x01\x7f\x00\x00\x01\x00\x35hello";
        let (h, off) = parse(d).unwrap();
        assert_eq!(h.frag, 0);
        assert_eq!(h.dest, Dest::Ip(sa("127.0.0.1:53")));
        assert_eq!(&d[off..], b"hello");

        let mut d = vec![0, 0, 0, 4];
        d.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        d.extend_from_slice(&[0x01, 0xbb]);
        let (h, off) = parse(&d).unwrap();
        assert_eq!(h.dest, Dest::Ip(sa("[2001:db8::1]:443")));
        assert_eq!(off, d.len(), "an empty payload is a payload");

        let d = b"\x00\x00\x02\x03\x0bexample.com\x00\x35x";
        let (h, off) = parse(d).unwrap();
        assert_eq!(h.frag, 2);
        assert_eq!(h.dest, Dest::Name("example.com", 53));
        assert_eq!(&d[off..], b"x");
    }

    #[test]
    fn refuses_what_is_not_a_header() {
        for short in [
            &b""[..],
            b"\x00\x00\x00",
            b"\x00\x00\x00\x01\x7f\x00\x00\x01\x00",
            b"\x00\x00\x00\x04\x00",
            b"\x00\x00\x00\x03",
            b"\x00\x00\x00\x03\x05abc",
            b"\x00\x00\x00\x03\x03abc\x00",
        ] {
            assert_eq!(parse(short), Err(Error::Short), "{short:?}");
        }
        assert_eq!(
            parse(b"\x00\x00\x00\x09\x7f\x00\x00\x01\x00\x35"),
            Err(Error::AddressType(9))
        );
        for bad in [
            &b"\x00\x00\x00\x03\x00\x00\x35"[..],
            b"\x00\x00\x00\x03\x03a b\x00\x35",
            b"\x00\x00\x00\x03\x02\xc3\xa9\x00\x35",
            b"\x00\x00\x00\x03\x03a\x00b\x00\x35",
        ] {
            assert_eq!(parse(bad), Err(Error::BadName), "{bad:?}");
        }
    }

    #[test]
    fn encodes_ip_sources_and_parses_back() {
        for s in ["192.0.2.1:4660", "[2001:db8::7]:53", "[::ffff:127.0.0.1]:9"] {
            let (h, n) = encode(sa(s));
            let (back, off) = parse(&h[..n]).unwrap();
            assert_eq!(off, n);
            let want = sa(s);
            let want = SocketAddr::new(crate::rules::canonical(want.ip()), want.port());
            assert_eq!(back.dest, Dest::Ip(want));
        }
        assert_eq!(encode(sa("127.0.0.1:53")).1, 10);
        assert_eq!(encode(sa("[::1]:53")).1, 22);
    }
}
