//! The header of a SOCKS5 UDP datagram (`dial::udp::header::parse`), against a
//! reference reading of RFC 1928, section 7, written here; and the header of a reply
//! (`header::encode`), read back by both.
//!
//! Input: a datagram as a client would send it to the relay, whole.
//!
//! Checked: `parse` accepts exactly what the reference accepts (ATYP 01 with 4 bytes,
//! 04 with 16, 03 with a length byte and a 1 to 255-byte name of letters, digits, `-`,
//! `.` and `_`, each followed by a 2-byte port), with the same FRAG, destination and
//! payload offset, and refuses the rest for the same reason (short, address type, bad
//! name); the offset never passes the end. For an IP destination, the header `encode`
//! writes for it is at most 22 bytes, carries an IP (never a name, and a mapped IPv6
//! address as IPv4), has FRAG 0, and parses back to the same address in front of the
//! same payload.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tcpsplice::dial::udp::header::{encode, parse, Dest, Error, MAX_IP_HEADER};

/// What the reference reads: FRAG, the destination, the payload's offset.
#[derive(Debug, PartialEq, Eq)]
enum Read<'a> {
    Ip(u8, SocketAddr, usize),
    Name(u8, &'a [u8], u16, usize),
    Short,
    AddressType(u8),
    BadName,
}

fn reference(d: &[u8]) -> Read<'_> {
    if d.len() < 4 {
        return Read::Short;
    }
    let frag = d[2];
    let port_at =
        |at: usize| -> Option<u16> { Some(u16::from_be_bytes([*d.get(at)?, *d.get(at + 1)?])) };
    match d[3] {
        1 => match port_at(8) {
            Some(p) => {
                let a = Ipv4Addr::new(d[4], d[5], d[6], d[7]);
                Read::Ip(frag, SocketAddr::new(IpAddr::V4(a), p), 10)
            }
            None => Read::Short,
        },
        4 => match port_at(20) {
            Some(p) => {
                let mut o = [0u8; 16];
                o.copy_from_slice(&d[4..20]);
                Read::Ip(frag, SocketAddr::new(IpAddr::V6(Ipv6Addr::from(o)), p), 22)
            }
            None => Read::Short,
        },
        3 => {
            let Some(&n) = d.get(4) else {
                return Read::Short;
            };
            let n = usize::from(n);
            let Some(p) = port_at(5 + n) else {
                return Read::Short;
            };
            let name = &d[5..5 + n];
            let ok = !name.is_empty()
                && name
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(b));
            if ok {
                Read::Name(frag, name, p, 7 + n)
            } else {
                Read::BadName
            }
        }
        t => Read::AddressType(t),
    }
}

/// The address as the relay writes it back: a mapped IPv6 address as IPv4.
fn unmapped(a: SocketAddr) -> SocketAddr {
    let port = a.port();
    match a.ip() {
        IpAddr::V6(v6) => match v6.octets() {
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a, b, c, d] => {
                SocketAddr::new(IpAddr::V4(Ipv4Addr::new(a, b, c, d)), port)
            }
            _ => SocketAddr::new(IpAddr::V6(v6), port),
        },
        _ => a,
    }
}

pub fn run(data: &[u8]) {
    let got = parse(data);
    let want = reference(data);
    match (&got, &want) {
        (Ok((h, off)), Read::Ip(frag, addr, at)) => {
            assert_eq!((h.frag, h.dest, *off), (*frag, Dest::Ip(*addr), *at));
        }
        (Ok((h, off)), Read::Name(frag, name, port, at)) => {
            let Dest::Name(n, p) = h.dest else {
                panic!("parse read {:?}, the reference a name", h.dest)
            };
            assert_eq!((h.frag, n.as_bytes(), p, *off), (*frag, *name, *port, *at));
        }
        (Err(Error::Short), Read::Short) | (Err(Error::BadName), Read::BadName) => {}
        (Err(Error::AddressType(a)), Read::AddressType(b)) => assert_eq!(a, b),
        _ => panic!("parse gave {got:?}, the reference {want:?}"),
    }
    let Ok((h, off)) = got else {
        return;
    };
    assert!(off <= data.len(), "offset {off} past {} bytes", data.len());
    let Dest::Ip(addr) = h.dest else {
        return;
    };
    let (head, n) = encode(addr);
    assert!(n <= MAX_IP_HEADER && n >= 10, "a header of {n} bytes");
    assert_eq!(&head[..3], &[0, 0, 0], "RSV and FRAG of a reply");
    assert!(head[3] == 1 || head[3] == 4, "a reply's ATYP {}", head[3]);
    let mut reply = head[..n].to_vec();
    reply.extend_from_slice(&data[off..]);
    assert_eq!(reference(&reply), Read::Ip(0, unmapped(addr), n));
    let (back, at) = parse(&reply).expect("a reply header parses");
    assert_eq!(
        (back.dest, &reply[at..]),
        (Dest::Ip(unmapped(addr)), &data[off..])
    );
}
