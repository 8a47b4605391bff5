//! Who is on each end of the connection, from the UCSPI environment.
//!
//! A supervisor describes the client in `TCPREMOTEIP`/`TCPREMOTEPORT` (and the local end
//! in `TCPLOCAL*`). A dialer conventionally rewrites the `TCP*` names to describe the
//! connection it made, as ucspi-tcp's `tcpclient` does; so before it does, tcpsplice-dial
//! saves the client as `TCPSPLICE_CLIENT=ip:port`, and the programs after it read the
//! client from there.

use std::net::{IpAddr, SocketAddr};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::RawFd;

use crate::{environ, sys};

/// The variable in which the client's address survives the dialer.
pub const CLIENT_VAR: &str = "TCPSPLICE_CLIENT";

fn var(name: &str) -> Option<String> {
    with_text(name, str::to_owned)
}

/// `f` of the value of `name` when it is set, not empty and text, as [`var`] would say,
/// read in place: copied only by what `f` keeps.
fn with_text<R>(name: &str, f: impl FnOnce(&str) -> R) -> Option<R> {
    environ::with_var(name, |v| {
        v.and_then(std::ffi::OsStr::to_str)
            .filter(|v| !v.is_empty())
            .map(f)
    })
}

/// `TCPREMOTEIP:TCPREMOTEPORT` as [`join_host_port`] joins them (`?` for no port).
fn remote() -> Option<String> {
    join_vars("TCPREMOTEIP", "TCPREMOTEPORT", Some("?"))
}

/// The variables `ip` and `port` joined as [`join_host_port`] joins them, read in place
/// and joined in one allocation (the dialer asks at every connection): None unless both
/// are set, not empty and text.
pub fn joined(ip: &str, port: &str) -> Option<String> {
    join_vars(ip, port, None)
}

/// [`joined`], with `no_port` standing for an unset port when given.
fn join_vars(ip: &str, port: &str, no_port: Option<&str>) -> Option<String> {
    let mut s = with_text(ip, |ip| {
        let mut s = String::with_capacity(ip.len() + 8);
        push_host(&mut s, ip);
        s.push(':');
        s
    })?;
    match with_text(port, |port| s.push_str(port)) {
        Some(()) => {}
        None => s.push_str(no_port?),
    }
    Some(s)
}

/// Whether `name` is set, not empty and text, as [`var`] would say, without a copy:
/// asked for every connection by three links.
fn has(name: &str) -> bool {
    with_text(name, |_| ()).is_some()
}

/// `ip:port`, with brackets around an IPv6 address.
pub fn join_host_port(ip: &str, port: &str) -> String {
    // Pushed into one allocation of the right size: `format!` costs several times more,
    // and this runs for every connection.
    let mut s = String::with_capacity(ip.len() + port.len() + 3);
    push_host(&mut s, ip);
    s.push(':');
    s.push_str(port);
    s
}

/// `host:port` as [`join_host_port`] joins them, for a numeric port.
pub fn join_host_port_number(host: &str, port: u16) -> String {
    let mut s = String::with_capacity(host.len() + 8);
    push_host(&mut s, host);
    s.push(':');
    push_decimal(&mut s, port.into());
    s
}

/// Appends `host`, in brackets when it is an IPv6 address.
fn push_host(s: &mut String, host: &str) {
    if host.contains(':') {
        s.push('[');
        s.push_str(host);
        s.push(']');
    } else {
        s.push_str(host);
    }
}

/// The client as `ip:port`, as far as the environment knows it.
pub fn client() -> Option<String> {
    var(CLIENT_VAR).or_else(remote)
}

/// The target as `host:port`: the connection a dialer made (the `TCPREMOTE*` it set), or
/// else what the client asked for.
pub fn target() -> Option<String> {
    if has(CLIENT_VAR) {
        if let Some(t) = remote() {
            return Some(t);
        }
    }
    var("TCPSPLICE_TARGET")
}

/// The client and the target of a relay whose client is read on `client_fd` and target
/// on `target_fd`, as its log line names them. Mostly the environment says ([`client`],
/// [`target`]); but after ucspi-tcp's `tcpclient` (`tcpserver ... tcpclient HOST PORT
/// tcpsplice`) `TCPREMOTE*` describe the upstream connection and nothing kept the
/// client. That case is told by the socket on `target_fd`, whose peer is then
/// `TCPREMOTEIP:TCPREMOTEPORT`: the target is that peer, the client the peer of the
/// socket on `client_fd`.
pub fn ends(client_fd: RawFd, target_fd: RawFd) -> (Option<String>, Option<String>) {
    if !has(CLIENT_VAR) {
        let remote = var("TCPREMOTEIP").zip(var("TCPREMOTEPORT"));
        if let (Some((ip, port)), Ok(Some(peer))) = (remote, sys::peer_addr(target_fd)) {
            let same_ip = ip
                .parse()
                .is_ok_and(|ip: IpAddr| ip_text(ip) == ip_text(peer.ip()));
            if same_ip && peer.port().to_string() == port {
                let client = sys::peer_addr(client_fd)
                    .ok()
                    .flatten()
                    .map(|c| addr_text(&c));
                return (client, Some(addr_text(&peer)));
            }
        }
    }
    (client(), target())
}

/// `ip:port` as UCSPI programs print an address, in brackets for IPv6.
fn addr_text(a: &SocketAddr) -> String {
    join_host_port(&ip_text(a.ip()), &a.port().to_string())
}

/// Fills `PROTO` and the `TCP*` variables from the socket on `fd` when no supervisor set
/// them (inetd, xinetd and systemd set none). Leaves set variables alone, and does
/// nothing when `fd` is not an IP socket.
pub fn fill_from_socket(fd: RawFd) {
    if has("TCPREMOTEIP") {
        return;
    }
    let (Ok(Some(peer)), Ok(Some(local))) = (sys::peer_addr(fd), sys::local_addr(fd)) else {
        return;
    };
    set_ucspi(&local, &peer);
}

/// Sets `PROTO=TCP` and the four `TCP*` variables for a connection.
pub fn set_ucspi(local: &SocketAddr, remote: &SocketAddr) {
    environ::set_var("PROTO", "TCP");
    set_ip("TCPLOCALIP", local.ip());
    set_decimal("TCPLOCALPORT", local.port().into());
    set_ip("TCPREMOTEIP", remote.ip());
    set_decimal("TCPREMOTEPORT", remote.port().into());
}

/// Sets `name` to `ip` as [`ip_text`] shows it. An IPv4 address (the common case) is
/// written by hand: the formatting machinery costs several times more, and this runs
/// twice per connection.
fn set_ip(name: &str, ip: IpAddr) {
    let v4 = match ip {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(v6) => v6.to_ipv4_mapped(),
    };
    let Some(v4) = v4 else {
        set_shown(name, format_args!("{}", IpText(ip)));
        return;
    };
    let mut buf = [0u8; 15];
    let n = dotted(v4, &mut buf);
    environ::set_var(name, std::ffi::OsStr::from_bytes(&buf[..n]));
}

/// `v4` in dotted decimal at the start of `buf`; returns the length.
fn dotted(v4: std::net::Ipv4Addr, buf: &mut [u8; 15]) -> usize {
    let mut n = 0;
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            buf[n] = b'.';
            n += 1;
        }
        // By hand for an octet's one to three digits: the general writer's loop and
        // copy were most of an address's cost, twice per connection.
        if octet >= 100 {
            buf[n] = b'0' + octet / 100;
            n += 1;
        }
        if octet >= 10 {
            buf[n] = b'0' + octet / 10 % 10;
            n += 1;
        }
        buf[n] = b'0' + octet % 10;
        n += 1;
    }
    n
}

/// Sets `name` to `v` in decimal.
fn set_decimal(name: &str, v: u32) {
    let mut room = [0u8; 20];
    environ::set_var(
        name,
        std::ffi::OsStr::from_bytes(digits_of(v.into(), &mut room)),
    );
}

/// `v`'s decimal digits, at the end of `room`.
fn digits_of(mut v: u64, room: &mut [u8; 20]) -> &[u8] {
    let mut k = room.len();
    loop {
        k -= 1;
        room[k] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    &room[k..]
}

/// Appends `v` in decimal: what `write!(s, "{v}")` does, for the lines and values made
/// at every connection, where the formatting machinery costs several times more.
pub fn push_decimal(s: &mut String, v: u64) {
    let mut room = [0u8; 20];
    digits_of(v, &mut room)
        .iter()
        .for_each(|&d| s.push(char::from(d)));
}

/// Appends `v` in decimal to bytes (see [`push_decimal`]).
pub fn push_decimal_bytes(s: &mut Vec<u8>, v: u64) {
    let mut room = [0u8; 20];
    s.extend_from_slice(digits_of(v, &mut room));
}

/// Appends `v4` in dotted decimal (see [`push_decimal`]).
pub fn push_ipv4(s: &mut String, v4: std::net::Ipv4Addr) {
    let mut buf = [0u8; 15];
    let n = dotted(v4, &mut buf);
    buf[..n].iter().for_each(|&b| s.push(char::from(b)));
}

/// Sets `name` to `value` formatted on the stack: set for every connection, an address
/// or a port would otherwise cost an allocation or two each.
fn set_shown(name: &str, value: std::fmt::Arguments) {
    use std::io::Write;
    let mut buf = [0u8; 64];
    let mut w = &mut buf[..];
    if w.write_fmt(value).is_ok() {
        let n = 64 - w.len();
        environ::set_var(name, std::ffi::OsStr::from_bytes(&buf[..n]));
    } else {
        environ::set_var(name, value.to_string());
    }
}

/// [`ip_text`] as a `Display`.
struct IpText(IpAddr);

impl std::fmt::Display for IpText {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self.0 {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => v4.fmt(f),
                None => v6.fmt(f),
            },
            IpAddr::V4(v4) => v4.fmt(f),
        }
    }
}

/// An address as UCSPI programs print it: IPv4-mapped IPv6 addresses as plain IPv4.
pub fn ip_text(ip: IpAddr) -> String {
    IpText(ip).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_written_decimals_are_what_display_writes() {
        for v in [0u32, 7, 10, 99, 100, 255, 65535, u32::MAX] {
            let mut room = [0u8; 20];
            assert_eq!(digits_of(v.into(), &mut room), v.to_string().as_bytes());
        }
        for v in [0u64, 9, 10, 65535, u64::from(u32::MAX) + 1, u64::MAX] {
            let mut s = String::from("x=");
            push_decimal(&mut s, v);
            assert_eq!(s, format!("x={v}"));
            let mut b = b"x=".to_vec();
            push_decimal_bytes(&mut b, v);
            assert_eq!(b, s.as_bytes());
        }
    }

    #[test]
    fn hand_written_addresses_are_what_display_writes() {
        for ip in ["0.0.0.0", "255.255.255.255", "10.0.12.1", "192.0.2.9"] {
            let v4: std::net::Ipv4Addr = ip.parse().unwrap();
            let mut b = [0u8; 15];
            let n = dotted(v4, &mut b);
            assert_eq!(&b[..n], ip.as_bytes());
        }
        for o in 0..=255u8 {
            let v4 = std::net::Ipv4Addr::new(o, 0, 99, o);
            let mut b = [0u8; 15];
            let n = dotted(v4, &mut b);
            assert_eq!(&b[..n], v4.to_string().as_bytes());
        }
    }

    #[test]
    fn client_and_target_from_the_environment() {
        // The only test here that changes the environment: the names are its own.
        for (ip, port, want) in [
            ("192.0.2.1", Some("80"), "192.0.2.1:80"),
            ("2001:db8::1", Some("443"), "[2001:db8::1]:443"),
            ("192.0.2.1", None, "192.0.2.1:?"),
            ("192.0.2.1", Some(""), "192.0.2.1:?"),
        ] {
            environ::set_var("TCPREMOTEIP", ip);
            match port {
                Some(p) => environ::set_var("TCPREMOTEPORT", p),
                None => environ::remove_var("TCPREMOTEPORT"),
            }
            environ::remove_var(CLIENT_VAR);
            assert_eq!(client().as_deref(), Some(want));
            environ::set_var(CLIENT_VAR, "198.51.100.7:9");
            assert_eq!(client().as_deref(), Some("198.51.100.7:9"));
            assert_eq!(target().as_deref(), Some(want));
        }
        environ::set_var("TCPREMOTEIP", "");
        environ::remove_var(CLIENT_VAR);
        assert_eq!(client(), None);
        for v in ["TCPREMOTEIP", "TCPREMOTEPORT"] {
            environ::remove_var(v);
        }
    }

    #[test]
    fn joined_by_hand_as_format_joins() {
        for (h, p) in [
            ("192.0.2.1", 80u16),
            ("2001:db8::1", 0),
            ("example.com", 65535),
        ] {
            let want = if h.contains(':') {
                format!("[{h}]:{p}")
            } else {
                format!("{h}:{p}")
            };
            assert_eq!(join_host_port(h, &p.to_string()), want);
            assert_eq!(join_host_port_number(h, p), want);
        }
        assert_eq!(join_host_port("::1", "?"), "[::1]:?");
    }
}
