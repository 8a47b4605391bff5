//! Which targets a client may reach: the `-a RULE` allow rules of tcpsplice-dial, the
//! per-user rules in `TCPSPLICE_RULES`, and the built-in deny list.
//!
//! A client that names its own target could otherwise use the proxy to reach this host's
//! loopback services, the private network behind it, or cloud metadata at 169.254.169.254.
//! So every address a client-chosen name resolves to is checked here, after DNS, before
//! anything connects to it.
//!
//! Rule syntax (one word, no spaces):
//!
//! | rule | matches |
//! |---|---|
//! | `10.1.2.3`, `2001:db8::1` | that address, any port |
//! | `10.0.0.0/8`, `2001:db8::/32` | the network, any port |
//! | `10.0.0.0/8:443`, `192.0.2.7:8000-8080` | the network, that port or port range |
//! | `[2001:db8::/32]:443`, `[::1]:22` | IPv6 with a port (the brackets are required) |
//! | `*`, `*:443`, `*:1-1023` | any address (only those the deny list passes), port(s) |
//!
//! IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) are checked as the IPv4 address they
//! carry, so a mapped loopback address is loopback.
//!
//! A rule lifts the deny list for an address only when the rule lies inside the denied
//! range the address falls in: its prefix is at least as long as the range's
//! (`127.0.0.0/8` and `127.0.0.1:5432` open loopback, `0.0.0.0/1`, like `0.0.0.0/0`
//! and `*`, opens nothing). See [`Policy::check`].

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Net {
    Any,
    V4(Ipv4Addr, u8),
    V6(Ipv6Addr, u8),
}

/// One allow rule: a network (or any address) and an optional port range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rule {
    net: Net,
    ports: Option<(u16, u16)>,
}

fn parse_ports(s: &str) -> Result<(u16, u16), String> {
    let port = |p: &str| match p.parse::<u16>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("not a port from 1 to 65535: {p}")),
    };
    match s.split_once('-') {
        None => port(s).map(|p| (p, p)),
        Some((a, b)) => {
            let (a, b) = (port(a)?, port(b)?);
            if a > b {
                return Err(format!("empty port range: {s}"));
            }
            Ok((a, b))
        }
    }
}

fn parse_net(s: &str) -> Result<Net, String> {
    let (ip, len) = match s.split_once('/') {
        None => (s, None),
        Some((ip, len)) => (ip, Some(len)),
    };
    let ip: IpAddr = ip.parse().map_err(|_| format!("not an IP address: {ip}"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = match len {
        None => max,
        Some(l) => match l.parse::<u8>() {
            Ok(n) if n <= max => n,
            _ => return Err(format!("not a prefix length from 0 to {max}: {l}")),
        },
    };
    let net = match ip {
        IpAddr::V4(a) => Net::V4(a, len),
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            // A mapped network is the IPv4 network it carries, as addresses are checked.
            Some(v4) if len >= 96 => Net::V4(v4, len - 96),
            _ => Net::V6(a, len),
        },
    };
    // Host bits set is almost always a typo (10.1.2.3/8 for 10.0.0.0/8): refuse it
    // rather than guess which of the two was meant.
    let exact = match net {
        Net::V4(a, l) => u32::from(a) & !mask32(l) == 0,
        Net::V6(a, l) => u128::from(a) & !mask128(l) == 0,
        Net::Any => true,
    };
    if !exact {
        return Err(format!("host bits set after the prefix length: {s}"));
    }
    Ok(net)
}

fn mask32(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len))
    }
}

fn mask128(len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(len))
    }
}

fn in_v4(a: Ipv4Addr, net: [u8; 4], len: u8) -> bool {
    (u32::from(a) ^ u32::from(Ipv4Addr::from(net))) & mask32(len) == 0
}

fn in_v6(a: Ipv6Addr, net: Ipv6Addr, len: u8) -> bool {
    (u128::from(a) ^ u128::from(net)) & mask128(len) == 0
}

impl Rule {
    /// Parses one rule (see the module documentation for the syntax).
    pub fn parse(s: &str) -> Result<Rule, String> {
        let s = s.trim();
        let bad = |why: String| Err(format!("bad rule {s:?}: {why}"));
        if s.is_empty() {
            return bad("empty".into());
        }
        let (net, ports) = if let Some(rest) = s.strip_prefix('[') {
            let Some((inside, after)) = rest.split_once(']') else {
                return bad("no closing ]".into());
            };
            let ports = match after {
                "" => None,
                _ => match after.strip_prefix(':') {
                    Some(p) => Some(p),
                    None => return bad(format!("expected :PORT after ], not {after:?}")),
                },
            };
            (inside, ports)
        } else if s.matches(':').count() > 1 {
            // Bare IPv6: a port would be ambiguous (::1:22 is an address), so none here.
            (s, None)
        } else {
            match s.split_once(':') {
                Some((net, ports)) => (net, Some(ports)),
                None => (s, None),
            }
        };
        let net = if net == "*" {
            Net::Any
        } else {
            match parse_net(net) {
                Ok(n) => n,
                Err(e) => return bad(e),
            }
        };
        let ports = match ports.map(parse_ports).transpose() {
            Ok(p) => p,
            Err(e) => return bad(e),
        };
        Ok(Rule { net, ports })
    }

    /// Whether the rule names ports (`CIDR:PORT`), not just addresses.
    pub fn has_ports(&self) -> bool {
        self.ports.is_some()
    }

    /// Whether `addr` (IP and port) is inside this rule.
    pub fn matches(&self, addr: &SocketAddr) -> bool {
        if let Some((lo, hi)) = self.ports {
            if !(lo..=hi).contains(&addr.port()) {
                return false;
            }
        }
        match (self.net, canonical(addr.ip())) {
            (Net::Any, _) => true,
            (Net::V4(net, len), IpAddr::V4(a)) => in_v4(a, net.octets(), len),
            (Net::V6(net, len), IpAddr::V6(a)) => in_v6(a, net, len),
            _ => false,
        }
    }

    /// Whether this rule, which matches `ip`, lifts the deny list for it: only when it
    /// lies inside the denied range, of prefix length `range` in the address's family
    /// ([`deny_range`]). So a rule for the whole address space or most of it (`*`,
    /// `0.0.0.0/0`, `0.0.0.0/1`, `::/1`) only restricts: `*:443` means "any public
    /// address on port 443", not "loopback too"; and a rule for a whole prefix that
    /// carries IPv4 addresses (`64:ff9b::/96`) is, for the IPv4 addresses inside, a
    /// rule for the whole IPv4 space: the internet through NAT64, not 10.0.0.1 or
    /// 127.0.0.1 through it.
    ///
    /// And always strictly inside the prefix that carries the address's IPv4 address:
    /// the local-use NAT64 prefix (64:ff9b:1::/48), denied whole because where the IPv4
    /// address sits under it cannot be known, is opened by a rule for part of it, not
    /// by one for all of it (the whole IPv4 space through a translator).
    pub fn lifts_deny_for(&self, ip: IpAddr, range: u8) -> bool {
        match (self.net, canonical(ip)) {
            (Net::V4(_, len), IpAddr::V4(_)) => len >= range,
            (Net::V6(_, len), IpAddr::V6(a)) => {
                len >= range && carrier_prefix(a).is_none_or(|carrier| len > carrier)
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for Rule {
    type Err = String;

    fn from_str(s: &str) -> Result<Rule, String> {
        Rule::parse(s)
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ports = match self.ports {
            None => String::new(),
            Some((a, b)) if a == b => format!(":{a}"),
            Some((a, b)) => format!(":{a}-{b}"),
        };
        match self.net {
            Net::Any => write!(f, "*{ports}"),
            Net::V4(a, len) => write!(f, "{a}/{len}{ports}"),
            Net::V6(a, len) if ports.is_empty() => write!(f, "{a}/{len}"),
            Net::V6(a, len) => write!(f, "[{a}/{len}]{ports}"),
        }
    }
}

/// Parses a whitespace-separated list of rules, as `TCPSPLICE_RULES` carries them.
pub fn parse_list(s: &str) -> Result<Vec<Rule>, String> {
    s.split_whitespace().map(Rule::parse).collect()
}

/// The address as it is checked: an IPv4-mapped IPv6 address becomes its IPv4 address.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => ip,
        },
        v4 => v4,
    }
}

fn deny_class_v4(a: Ipv4Addr) -> Option<(&'static str, u8)> {
    const LIST: &[([u8; 4], u8, &str)] = &[
        ([0, 0, 0, 0], 8, "unspecified (0.0.0.0/8)"),
        ([127, 0, 0, 0], 8, "loopback"),
        ([10, 0, 0, 0], 8, "private (10.0.0.0/8)"),
        ([172, 16, 0, 0], 12, "private (172.16.0.0/12)"),
        ([192, 168, 0, 0], 16, "private (192.168.0.0/16)"),
        (
            [100, 64, 0, 0],
            10,
            "shared address space (CGNAT, 100.64.0.0/10)",
        ),
        ([169, 254, 0, 0], 16, "link-local (169.254.0.0/16)"),
        (
            [192, 0, 0, 0],
            24,
            "IETF protocol assignments (192.0.0.0/24)",
        ),
        ([192, 0, 2, 0], 24, "documentation (192.0.2.0/24)"),
        ([198, 51, 100, 0], 24, "documentation (198.51.100.0/24)"),
        ([203, 0, 113, 0], 24, "documentation (203.0.113.0/24)"),
        ([198, 18, 0, 0], 15, "benchmarking (198.18.0.0/15)"),
        ([224, 0, 0, 0], 4, "multicast"),
        ([240, 0, 0, 0], 4, "reserved or broadcast (240.0.0.0/4)"),
    ];
    LIST.iter()
        .find(|(net, len, _)| in_v4(a, *net, *len))
        .map(|(_, len, class)| (*class, *len))
}

/// The length of the prefix under which `a` carries an IPv4 address (NAT64's well-known
/// 64:ff9b::/96 and local-use 64:ff9b:1::/48, 6to4's 2002::/16), if it does.
fn carrier_prefix(a: Ipv6Addr) -> Option<u8> {
    if in_v6(a, Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0), 96) {
        Some(96)
    } else if in_v6(a, Ipv6Addr::new(0x64, 0xff9b, 1, 0, 0, 0, 0, 0), 48) {
        Some(48)
    } else if a.segments()[0] == 0x2002 {
        Some(16)
    } else {
        None
    }
}

fn deny_class_v6(a: Ipv6Addr) -> Option<(&'static str, u8)> {
    let seg = a.segments();
    let embedded =
        |hi: u16, lo: u16| Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8);
    if a.is_unspecified() {
        return Some(("unspecified (::)", 128));
    }
    if a.is_loopback() {
        return Some(("loopback", 128));
    }
    // Addresses that carry an IPv4 address reach it: judge them by the one they carry,
    // as the range of the carrier that holds that IPv4 range.
    let carried = match carrier_prefix(a) {
        Some(96) => Some((96, embedded(seg[6], seg[7]))),
        // Where the IPv4 address sits under a local-use prefix depends on the length
        // the translator was given (RFC 6052: /48 to /96): it cannot be judged here.
        Some(48) => return Some(("local-use NAT64 (64:ff9b:1::/48)", 48)),
        Some(len) => Some((len, embedded(seg[1], seg[2]))),
        None => None,
    };
    if let Some((carrier, v4)) = carried {
        return deny_class_v4(v4).map(|(class, len)| (class, carrier + len));
    }
    // SIIT's IPv4-translated form (RFC 2765, obsoleted by RFC 6145 and used by no
    // translator since): denied outright rather than judged by its IPv4 address, since
    // nothing legitimate needs it and nothing here knows where it leads.
    if seg[..6] == [0, 0, 0, 0, 0xffff, 0] {
        return Some(("IPv4-translated (::ffff:0:0:0/96)", 96));
    }
    const LIST: &[(u16, u16, u8, &str)] = &[
        // (first segment, second segment, prefix length, class)
        (0, 0, 96, "IPv4-compatible (::/96)"),
        (0x100, 0, 64, "discard-only (100::/64)"),
        (0x2001, 0xdb8, 32, "documentation (2001:db8::/32)"),
        (0xfc00, 0, 7, "unique local (fc00::/7)"),
        (0xfe80, 0, 10, "link-local (fe80::/10)"),
        (0xfec0, 0, 10, "site-local (fec0::/10)"),
        (0xff00, 0, 8, "multicast"),
    ];
    LIST.iter()
        .find(|(s0, s1, len, _)| in_v6(a, Ipv6Addr::new(*s0, *s1, 0, 0, 0, 0, 0, 0), *len))
        .map(|(_, _, len, class)| (*class, *len))
}

/// The class of the built-in deny list that `ip` falls in (loopback, private, link-local,
/// multicast, unspecified, CGNAT, ULA, documentation, ...), and the prefix length of
/// that range in the family of `ip` as checked (IPv4 for a mapped address), or None for
/// a public address. This host's own addresses are not known here: see [`Policy::own`].
pub fn deny_range(ip: IpAddr) -> Option<(&'static str, u8)> {
    match canonical(ip) {
        IpAddr::V4(a) => deny_class_v4(a),
        IpAddr::V6(a) => deny_class_v6(a),
    }
}

/// The class alone: see [`deny_range`].
pub fn deny_class(ip: IpAddr) -> Option<&'static str> {
    deny_range(ip).map(|(class, _)| class)
}

/// The network of prefix length `len` that holds `ip`, for messages.
fn network(ip: IpAddr, len: u8) -> String {
    match ip {
        IpAddr::V4(a) => format!("{}/{len}", Ipv4Addr::from(u32::from(a) & mask32(len))),
        IpAddr::V6(a) => format!("{}/{len}", Ipv6Addr::from(u128::from(a) & mask128(len))),
    }
}

/// The whole decision for a client-chosen target address.
pub struct Policy<'a> {
    /// The `-a` rules. None given: every address the deny list passes is allowed. Some
    /// given: only addresses matching one, and a match lifts the deny list when the
    /// rule lies inside the denied range (see [`Rule::lifts_deny_for`]).
    pub allow: &'a [Rule],
    /// The user's own rules (`TCPSPLICE_RULES`): when Some, the address must also match
    /// one of them. They restrict only; they never lift the deny list.
    pub user: Option<&'a [Rule]>,
    /// Addresses known to be this host's, denied like loopback; each is a range of its
    /// own, so only a rule for that one address lifts it (unless it is in the deny list
    /// too). tcpsplice-dial names the address the routing table delivers to this host
    /// (`dial::dialer::judge`).
    pub own: &'a [IpAddr],
}

impl Policy<'_> {
    /// Ok when `addr` may be connected to; otherwise why not, naming the deny class or
    /// the rules that failed, for the log line.
    pub fn check(&self, addr: &SocketAddr) -> Result<(), String> {
        let ip = canonical(addr.ip());
        let addr = SocketAddr::new(ip, addr.port());
        let denied = deny_range(ip).or_else(|| {
            let host = if ip.is_ipv4() { 32 } else { 128 };
            self.own
                .iter()
                .any(|&o| canonical(o) == ip)
                .then_some(("this host's own address", host))
        });
        if self.allow.is_empty() {
            if let Some((class, _)) = denied {
                return Err(format!("{ip} is {class} (default deny list)"));
            }
        } else if !self.allow.iter().any(|r| {
            r.matches(&addr) && denied.is_none_or(|(_, range)| r.lifts_deny_for(ip, range))
        }) {
            return Err(match denied {
                Some((class, range)) => format!(
                    "{ip} is {class} (default deny list) and no -a rule lifts it (only a \
                     rule inside {} does)",
                    network(ip, range)
                ),
                None => format!("{addr} matches no -a rule"),
            });
        }
        if let Some(user) = self.user {
            if !user.iter().any(|r| r.matches(&addr)) {
                return Err(format!(
                    "{addr} matches none of the user's rules (TCPSPLICE_RULES)"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn r(s: &str) -> Rule {
        Rule::parse(s).unwrap()
    }

    #[test]
    fn parses_and_prints() {
        for (text, shown) in [
            ("10.0.0.0/8", "10.0.0.0/8"),
            ("10.1.2.3", "10.1.2.3/32"),
            ("10.0.0.0/8:443", "10.0.0.0/8:443"),
            ("192.0.2.7:8000-8080", "192.0.2.7/32:8000-8080"),
            ("2001:db8::/32", "2001:db8::/32"),
            ("::1", "::1/128"),
            ("[2001:db8::/32]:443", "[2001:db8::/32]:443"),
            ("[::1]:22", "[::1/128]:22"),
            ("[::1]", "::1/128"),
            ("*", "*"),
            ("*:1-1023", "*:1-1023"),
            ("::ffff:127.0.0.0/104", "127.0.0.0/8"),
            ("0.0.0.0/0:443", "0.0.0.0/0:443"),
        ] {
            assert_eq!(r(text).to_string(), shown, "{text}");
        }
        for bad in [
            "",
            "10.0.0.0/33",
            "10.1.2.3/8",
            "10.0.0.0/8:0",
            "10.0.0.0/8:70000",
            "10.0.0.0/8:9-8",
            "10.0.0.0/8:",
            "example.com",
            "[::1",
            "[::1]22",
            "::/129",
            "1.2.3.4:x",
        ] {
            assert!(Rule::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn matches_addresses_and_ports() {
        assert!(r("127.0.0.0/8").matches(&sa("127.1.2.3:9")));
        assert!(!r("127.0.0.0/8").matches(&sa("128.0.0.1:9")));
        assert!(r("127.0.0.0/8:80").matches(&sa("127.0.0.1:80")));
        assert!(!r("127.0.0.0/8:80").matches(&sa("127.0.0.1:81")));
        assert!(r("10.0.0.0/8:80-90").matches(&sa("10.9.9.9:90")));
        assert!(!r("10.0.0.0/8:80-90").matches(&sa("10.9.9.9:91")));
        // Mapped addresses are their IPv4 address.
        assert!(r("127.0.0.1").matches(&sa("[::ffff:127.0.0.1]:5")));
        // The mapped space is the whole IPv4 space, and like 0.0.0.0/0 it lifts nothing.
        let lifts = |rule: &str, ip: &str| {
            let ip: IpAddr = ip.parse().unwrap();
            let (_, range) = deny_range(ip).unwrap();
            r(rule).lifts_deny_for(ip, range)
        };
        assert!(r("::ffff:0:0/96").matches(&sa("127.0.0.1:5")));
        assert!(!lifts("::ffff:0:0/96", "127.0.0.1"));
        // Likewise a rule for a whole prefix that carries IPv4 addresses, for what it
        // carries; a narrower one names the IPv4 addresses it means.
        assert!(!lifts("64:ff9b::/96", "64:ff9b::7f00:1"));
        assert!(!lifts("64:ff9b::/97", "64:ff9b::7f00:1"));
        assert!(!lifts("2002::/16", "2002:a00:1::"));
        assert!(lifts("64:ff9b::7f00:0/120", "64:ff9b::7f00:1"));
        assert!(lifts("64:ff9b::7f00:0/104", "64:ff9b::7f00:1"));
        // The local-use NAT64 prefix: all of it is no rule for what it carries.
        assert!(!lifts("64:ff9b:1::/48", "64:ff9b:1:a00:0:100:808:808"));
        assert!(lifts("64:ff9b:1::/64", "64:ff9b:1:a00:0:100:808:808"));
        assert!(lifts("2002:a00::/24", "2002:a00:1::"));
        assert!(lifts("fd00::/8", "fd00::2"));
        // Only a rule inside the denied range lifts it: most of the space is not enough.
        assert!(lifts("127.0.0.0/8", "127.0.0.1"));
        assert!(lifts("127.0.0.1", "127.0.0.1"));
        assert!(lifts("10.1.0.0/16", "10.1.2.3"));
        assert!(lifts("172.16.0.0/12", "172.20.0.1"));
        for (rule, ip) in [
            ("0.0.0.0/1", "127.0.0.1"),
            ("0.0.0.0/1", "0.0.0.0"),
            ("0.0.0.0/4", "10.0.0.1"),
            ("96.0.0.0/3", "127.0.0.1"),
            ("172.0.0.0/8", "172.16.0.1"),
            ("::/1", "::1"),
            ("::/127", "::1"),
            ("fc00::/6", "fd00::1"),
            ("*", "127.0.0.1"),
            ("127.0.0.0/8", "::1"),
        ] {
            assert!(!lifts(rule, ip), "{rule} lifts the deny list for {ip}");
        }
        assert!(r("[2001:db8::/32]:443").matches(&sa("[2001:db8:1::5]:443")));
        assert!(!r("[2001:db8::/32]:443").matches(&sa("[2001:db9::5]:443")));
        assert!(!r("10.0.0.0/8").matches(&sa("[2001:db8::1]:1")));
        assert!(r("*:22").matches(&sa("[2001:db8::1]:22")));
        assert!(r("0.0.0.0/0").matches(&sa("8.8.8.8:1")));
    }

    #[test]
    fn deny_classes() {
        let class = |s: &str| deny_class(s.parse().unwrap());
        for denied in [
            "127.0.0.1",
            "0.0.0.0",
            "10.1.1.1",
            "172.31.255.255",
            "192.168.0.1",
            "100.64.0.1",
            "169.254.169.254",
            "224.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "fd00::2",
            "fe80::1",
            "ff02::1",
            "64:ff9b::7f00:1",
            "64:ff9b:1:a00:0:100:808:808",
            "2002:a00:1::",
            "::7f00:1",
            "::ffff:0:7f00:1",
            "::ffff:0:808:808",
        ] {
            assert!(class(denied).is_some(), "{denied} not denied");
        }
        for public in [
            "8.8.8.8",
            "172.32.0.1",
            "100.128.0.1",
            "2a00:1450::1",
            "64:ff9b::808:808",
        ] {
            assert_eq!(class(public), None, "{public} denied");
        }
        assert_eq!(class("::ffff:127.0.0.1"), Some("loopback"));
        assert_eq!(
            deny_range("64:ff9b::a00:1".parse().unwrap()),
            Some(("private (10.0.0.0/8)", 104))
        );
        assert_eq!(
            deny_range("2002:7f00:1::".parse().unwrap()),
            Some(("loopback", 24))
        );
    }

    /// A policy of `-a` rules alone.
    fn allowing<'a>(allow: &'a [Rule], own: &'a [IpAddr]) -> Policy<'a> {
        Policy {
            allow,
            user: None,
            own,
        }
    }

    #[test]
    fn policy() {
        let own: Vec<IpAddr> = vec!["8.8.4.4".parse().unwrap()];
        let open = Policy {
            allow: &[],
            user: None,
            own: &own,
        };
        assert!(open.check(&sa("8.8.8.8:443")).is_ok());
        let e = open.check(&sa("127.0.0.1:22")).unwrap_err();
        assert!(e.contains("loopback"), "{e}");
        let e = open.check(&sa("8.8.4.4:22")).unwrap_err();
        assert!(e.contains("own address"), "{e}");

        let allow = [r("127.0.0.0/8:22"), r("*:443")];
        let p = allowing(&allow, &own);
        assert!(p.check(&sa("127.0.0.1:22")).is_ok());
        assert!(p.check(&sa("8.8.8.8:443")).is_ok());
        assert!(p
            .check(&sa("8.8.8.8:80"))
            .unwrap_err()
            .contains("no -a rule"));
        // A whole-space rule restricts ports but does not open the deny list.
        assert!(p
            .check(&sa("127.0.0.1:443"))
            .unwrap_err()
            .contains("loopback"));
        assert!(p.check(&sa("127.0.0.1:23")).is_err());
        // Most of the space is no better than all of it.
        let allow = [r("0.0.0.0/1"), r("::/1"), r("8.8.0.0/16")];
        let p = allowing(&allow, &own);
        assert!(p.check(&sa("1.1.1.1:443")).is_ok());
        let e = p.check(&sa("127.0.0.1:22")).unwrap_err();
        assert!(e.contains("only a rule inside 127.0.0.0/8"), "{e}");
        assert!(p.check(&sa("0.0.0.0:22")).is_err());
        assert!(p.check(&sa("10.0.0.1:22")).is_err());
        assert!(p.check(&sa("[::1]:22")).is_err());
        // This host's own address: only a rule for it, not one for its network.
        let e = p.check(&sa("8.8.4.4:22")).unwrap_err();
        assert!(e.contains("only a rule inside 8.8.4.4/32"), "{e}");
        let allow = [r("8.8.4.4")];
        let p = allowing(&allow, &own);
        assert!(p.check(&sa("8.8.4.4:22")).is_ok());

        // The internet through NAT64, not the private network behind the translator.
        let allow = [r("64:ff9b::/96")];
        let p = allowing(&allow, &own);
        assert!(p.check(&sa("[64:ff9b::808:808]:443")).is_ok());
        assert!(p.check(&sa("[64:ff9b::a00:1]:443")).is_err());
        assert!(p.check(&sa("[64:ff9b::a9fe:a9fe]:80")).is_err());

        let user = [r("8.8.8.0/24")];
        let p = Policy {
            allow: &[],
            user: Some(&user),
            own: &own,
        };
        assert!(p.check(&sa("8.8.8.8:443")).is_ok());
        assert!(p
            .check(&sa("1.1.1.1:443"))
            .unwrap_err()
            .contains("TCPSPLICE_RULES"));
        // User rules never lift the deny list, nor widen what -a allows.
        let user = [r("127.0.0.1")];
        for allow in [&[][..], &[r("*")], &[r("0.0.0.0/1")], &[r("8.8.8.0/24")]] {
            let p = Policy {
                allow,
                user: Some(&user),
                own: &own,
            };
            assert!(p.check(&sa("127.0.0.1:1")).is_err(), "{allow:?}");
        }
        assert_eq!(parse_list(" 10.0.0.0/8  *:443 ").unwrap().len(), 2);
        assert_eq!("*:443".parse::<Rule>(), Ok(r("*:443")));
        assert!(parse_list("10.0.0.0/8 bogus").is_err());
    }
}
