//! Target rules (`Rule::parse`, `Rule::matches`) and the whole decision for a
//! client-chosen address (`rules::Policy::check`), against a model written here.
//!
//! Input: choices of a target address (often in or near a dangerous range, or carried
//! by NAT64 or 6to4), a port, this host's addresses, `-a` rules and the user's rules,
//! each rule chosen as a network, prefix and ports (often the target's) and then spelled
//! in one of the syntaxes tcpsplice takes; what is left of the input is parsed as a raw
//! rule list.
//!
//! Checked:
//! - a dangerous address, from the list below (loopback, private, link-local, CGNAT,
//!   multicast, unspecified, reserved, IPv4-compatible, NAT64 and 6to4 carrying one of
//!   these, this host's own), is never allowed without an `-a` rule that names it: one
//!   whose network holds it with a prefix longer than 0, and longer than the carrying
//!   prefix for an address carried by NAT64 or 6to4; no `-a` rule at all allows none;
//! - a user's rules never widen: allowed with them implies allowed without them, and
//!   matched by one of them; and `-a` rules, when given, restrict: one of them matches;
//! - a mapped address acts as its IPv4 address: the same answer for the target, this
//!   host's addresses and the rules written either way;
//! - each rule is accepted exactly when its spelling is valid (host bits clear, ports
//!   1 to 65535, a range in order), matches what the model says, prints as text that
//!   parses back to it, and a list parses as its rules.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tcpsplice::rules::{self, Policy, Rule};

use crate::bytes::Bytes;

/// Dangerous IPv4 networks (RFC 6890 and DESIGN.md's deny list): this list, not
/// tcpsplice's, is what the invariants use.
const DANGER_V4: &[([u8; 4], u8)] = &[
    ([0, 0, 0, 0], 8),      // "this network"; 0.0.0.0 connects to this host
    ([10, 0, 0, 0], 8),     // private
    ([100, 64, 0, 0], 10),  // shared address space (CGNAT)
    ([127, 0, 0, 0], 8),    // loopback
    ([169, 254, 0, 0], 16), // link-local, cloud metadata
    ([172, 16, 0, 0], 12),  // private
    ([192, 0, 0, 0], 24),   // IETF protocol assignments
    ([192, 168, 0, 0], 16), // private
    ([198, 18, 0, 0], 15),  // benchmarking
    ([224, 0, 0, 0], 4),    // multicast
    ([240, 0, 0, 0], 4),    // reserved, broadcast
];

/// Dangerous IPv6 networks not carrying an IPv4 address.
const DANGER_V6: &[(u128, u8)] = &[
    (0, 128),                                         // unspecified
    (1, 128),                                         // loopback
    (0, 96),                                          // IPv4-compatible (::a.b.c.d)
    (0xfc00 << 112, 7),                               // unique local
    (0xfe80 << 112, 10),                              // link-local
    (0xfec0 << 112, 10),                              // site-local
    (0xff00 << 112, 8),                               // multicast
    ((0x64 << 112) | (0xff9b << 96) | (1 << 80), 48), // local-use NAT64: cannot be judged
];

const NAT64: u128 = (0x64 << 112) | (0xff9b << 96);

fn mask32(len: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0)
}

fn mask128(len: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0)
}

fn in4(a: u32, net: u32, len: u8) -> bool {
    (a ^ net) & mask32(len) == 0
}

fn in6(a: u128, net: u128, len: u8) -> bool {
    (a ^ net) & mask128(len) == 0
}

/// An IPv4-mapped address as its IPv4 address (written here, not rules::canonical).
fn canon(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(a) if u128::from(a) >> 32 == 0xffff => {
            IpAddr::V4(Ipv4Addr::from(u128::from(a) as u32))
        }
        ip => ip,
    }
}

fn mapped(a: Ipv4Addr) -> Ipv6Addr {
    Ipv6Addr::from((0xffff_u128 << 32) | u128::from(u32::from(a)))
}

fn danger4(a: u32) -> bool {
    DANGER_V4
        .iter()
        .any(|&(net, len)| in4(a, u32::from_be_bytes(net), len))
}

/// Whether `ip` is dangerous, and if so the prefix length an `-a` rule must exceed to
/// name it: 0, or the length of the prefix carrying its IPv4 address.
fn danger(ip: IpAddr, own: &[IpAddr]) -> Option<u8> {
    let ip = canon(ip);
    if own.iter().any(|&o| canon(o) == ip) {
        return Some(0);
    }
    match ip {
        IpAddr::V4(a) => danger4(u32::from(a)).then_some(0),
        IpAddr::V6(a) => {
            let a = u128::from(a);
            if in6(a, NAT64, 96) {
                return danger4(a as u32).then_some(96);
            }
            if a >> 112 == 0x2002 {
                return danger4((a >> 80) as u32).then_some(16);
            }
            DANGER_V6
                .iter()
                .find(|&&(net, len)| in6(a, net, len))
                .map(|&(_, len)| if len == 48 { 48 } else { 0 })
        }
    }
}

/// What a rule means.
#[derive(Clone, Copy, Debug)]
enum Net {
    Any,
    V4(u32, u8),
    V6(u128, u8),
}

#[derive(Clone, Copy, Debug)]
struct Model {
    net: Net,
    ports: Option<(u16, u16)>,
}

impl Model {
    fn matches(&self, addr: SocketAddr) -> bool {
        if let Some((lo, hi)) = self.ports {
            if addr.port() < lo || addr.port() > hi {
                return false;
            }
        }
        match (self.net, canon(addr.ip())) {
            (Net::Any, _) => true,
            (Net::V4(net, len), IpAddr::V4(a)) => in4(u32::from(a), net, len),
            (Net::V6(net, len), IpAddr::V6(a)) => in6(u128::from(a), net, len),
            _ => false,
        }
    }

    /// Whether the rule names `addr`, dangerous with `carrier` as in [`danger`].
    fn names(&self, addr: SocketAddr, carrier: u8) -> bool {
        let len = match self.net {
            Net::Any => return false,
            Net::V4(_, l) | Net::V6(_, l) => l,
        };
        self.matches(addr) && len > 0 && len > carrier
    }
}

fn v4_addr(r: &mut Bytes) -> u32 {
    match r.below(3) {
        0 => {
            let (net, len) = DANGER_V4[r.below(DANGER_V4.len())];
            u32::from_be_bytes(net) | (r.u32() & !mask32(len))
        }
        1 => [0x0808_0808, 0x0101_0101, 0x7f00_0001, 0xa9fe_a9fe, 0][r.below(5)],
        _ => r.u32(),
    }
}

fn gen_addr(r: &mut Bytes) -> IpAddr {
    let v6 = |a: u128| IpAddr::V6(Ipv6Addr::from(a));
    match r.below(8) {
        0 | 1 => IpAddr::V4(Ipv4Addr::from(v4_addr(r))),
        2 => {
            let (net, len) = DANGER_V6[r.below(DANGER_V6.len())];
            v6(net | (r.u128() & !mask128(len)))
        }
        3 => v6(r.u128()),
        4 => v6(NAT64 | u128::from(v4_addr(r))),
        5 => v6((0x2002 << 112) | (u128::from(v4_addr(r)) << 80) | (r.u128() & ((1 << 80) - 1))),
        6 => v6((0x2a00_1450_u128 << 96) | u128::from(r.u16())),
        _ => v6(u128::from(v4_addr(r))),
    }
}

fn gen_ports(r: &mut Bytes, port: u16) -> (String, Option<(u16, u16)>, bool) {
    let near = |r: &mut Bytes| match r.below(4) {
        0 => r.u16(),
        1 => port.wrapping_add(1),
        2 => port.wrapping_sub(1),
        _ => port,
    };
    match r.below(5) {
        0 | 1 => (String::new(), None, true),
        2 => {
            let p = near(r);
            (format!(":{p}"), Some((p, p)), p != 0)
        }
        3 => {
            let (a, b) = (near(r), near(r));
            (
                format!(":{a}-{b}"),
                Some((a, b)),
                a != 0 && b != 0 && a <= b,
            )
        }
        _ => {
            let junk = [":", ":0", ":65536", ":1-", ":-1", ":x", ":1:2", ": 1"][r.below(8)];
            (junk.to_string(), None, false)
        }
    }
}

/// A rule's text, and its meaning when the text is valid.
fn gen_rule(r: &mut Bytes, near: IpAddr, port: u16) -> (String, Option<Model>) {
    let (ports, pmodel, ports_ok) = gen_ports(r, port);
    let keep_host_bits = r.below(16) == 0;
    let kind = r.below(8);
    let near = canon(near);
    let (text, net, net_ok) = match kind {
        0 => (format!("*{ports}"), Net::Any, true),
        1..=3 => {
            let base = match (near, kind) {
                (IpAddr::V4(a), 1 | 2) => u32::from(a),
                _ => v4_addr(r),
            };
            let len = r.below(33) as u8;
            let net = base & if keep_host_bits { !0 } else { mask32(len) };
            let ok = net & !mask32(len) == 0;
            let ip = Ipv4Addr::from(net);
            let text = match (kind, r.below(3)) {
                // Written as a mapped IPv6 network: the IPv4 network it carries.
                (3, 0) => format!("::ffff:{ip}/{}{ports}", u32::from(len) + 96),
                (3, 1) if ports.is_empty() => format!("[{}/{}]", mapped(ip), u32::from(len) + 96),
                (3, _) => format!("[::ffff:{ip}/{}]{ports}", u32::from(len) + 96),
                (_, 0) if len == 32 => format!("{ip}{ports}"),
                _ => format!("{ip}/{len}{ports}"),
            };
            // A mapped network without brackets takes no port.
            let ports_ok = ports_ok && !(kind == 3 && text.starts_with(':') && !ports.is_empty());
            (text, Net::V4(net, len), ok && ports_ok)
        }
        _ => {
            let base = match (near, kind) {
                (IpAddr::V6(a), 4..=6) => u128::from(a),
                _ => r.u128(),
            };
            let len = r.below(129) as u8;
            let net = base & if keep_host_bits { !0 } else { mask128(len) };
            let ok = net & !mask128(len) == 0;
            let ip = Ipv6Addr::from(net);
            let text = match r.below(3) {
                0 if ports.is_empty() && len == 128 => format!("{ip}"),
                0 if ports.is_empty() => format!("{ip}/{len}"),
                1 if len == 128 => format!("[{ip}]{ports}"),
                _ => format!("[{ip}/{len}]{ports}"),
            };
            // A mapped network of /96 or longer is the IPv4 network it carries.
            let model = if len >= 96 && net >> 32 == 0xffff {
                Net::V4(net as u32, len - 96)
            } else {
                Net::V6(net, len)
            };
            (text, model, ok)
        }
    };
    let pad = ["", " ", "\t"][r.below(3)];
    let text = format!("{pad}{text}{pad}");
    let valid = net_ok && ports_ok;
    (text, valid.then_some(Model { net, ports: pmodel }))
}

/// Parses the generated rules, checking each against its model; the valid ones.
fn rule_list(r: &mut Bytes, near: IpAddr, port: u16, n: usize) -> Vec<(Rule, Model)> {
    let mut out = Vec::new();
    for _ in 0..n {
        let (text, model) = gen_rule(r, near, port);
        match (Rule::parse(&text), model) {
            (Ok(rule), Some(m)) => {
                check_rule(&rule);
                out.push((rule, m));
            }
            (Err(_), None) => {}
            (Ok(rule), None) => panic!("invalid rule {text:?} accepted as {rule}"),
            (Err(e), Some(m)) => panic!("valid rule {text:?} ({m:?}) refused: {e}"),
        }
    }
    out
}

/// Checks that hold for any accepted rule: it prints as text that parses back to it.
fn check_rule(rule: &Rule) {
    let shown = rule.to_string();
    assert_eq!(
        Rule::parse(&shown).as_ref(),
        Ok(rule),
        "{rule:?} prints as {shown:?}"
    );
}

fn check(
    allow: &[Rule],
    user: Option<&[Rule]>,
    own: &[IpAddr],
    addr: SocketAddr,
) -> Result<(), String> {
    Policy { allow, user, own }.check(&addr)
}

pub fn run(data: &[u8]) {
    let mut r = Bytes::new(data);
    let ip = gen_addr(&mut r);
    let port = match r.below(4) {
        0 => [22, 80, 443, 1, 65535, 0][r.below(6)],
        _ => r.u16(),
    };
    let own: Vec<IpAddr> = match r.below(4) {
        0 => vec![],
        1 => vec![ip],
        _ => vec![gen_addr(&mut r), gen_addr(&mut r)],
    };
    let n_allow = r.below(5);
    let allow = rule_list(&mut r, ip, port, n_allow);
    let user = match r.below(3) {
        0 => None,
        _ => {
            let n = 1 + r.below(3);
            Some(rule_list(&mut r, ip, port, n))
        }
    };
    let allow_rules: Vec<Rule> = allow.iter().map(|(r, _)| *r).collect();
    let user_rules: Option<Vec<Rule>> = user.as_ref().map(|u| u.iter().map(|(r, _)| *r).collect());

    // The rules of one list read back as that list.
    let joined: Vec<String> = allow_rules.iter().map(Rule::to_string).collect();
    assert_eq!(
        rules::parse_list(&joined.join(" ")).as_ref(),
        Ok(&allow_rules)
    );

    let addr = SocketAddr::new(ip, port);
    for (rule, m) in allow.iter().chain(user.iter().flatten()) {
        assert_eq!(
            rule.matches(&addr),
            m.matches(addr),
            "{rule} on {addr} ({m:?})"
        );
    }
    let verdict = check(&allow_rules, user_rules.as_deref(), &own, addr);

    if verdict.is_ok() {
        if let Some(carrier) = danger(ip, &own) {
            assert!(
                allow.iter().any(|(_, m)| m.names(addr, carrier)),
                "dangerous {addr} allowed by no rule that names it (allow {allow_rules:?}, own {own:?})"
            );
        }
        if !allow.is_empty() {
            assert!(
                allow.iter().any(|(_, m)| m.matches(addr)),
                "{addr} allowed by no -a rule"
            );
        }
        if let Some(user) = &user {
            assert!(
                user.iter().any(|(_, m)| m.matches(addr)),
                "{addr} allowed by none of the user's rules"
            );
            let without = check(&allow_rules, None, &own, addr);
            assert!(
                without.is_ok(),
                "the user's rules widen: {addr} allowed only with them ({without:?})"
            );
        }
    }

    // A mapped address acts as its IPv4 address: as the target, as one of this host's
    // addresses, and in a rule.
    if let IpAddr::V4(a) = canon(ip) {
        let m = SocketAddr::new(IpAddr::V6(mapped(a)), port);
        let v4 = SocketAddr::new(IpAddr::V4(a), port);
        let as_v4 = check(&allow_rules, user_rules.as_deref(), &own, v4);
        assert_eq!(
            check(&allow_rules, user_rules.as_deref(), &own, m),
            as_v4,
            "{m} and {v4}"
        );
        let own_mapped: Vec<IpAddr> = own
            .iter()
            .map(|&o| match canon(o) {
                IpAddr::V4(a) => IpAddr::V6(mapped(a)),
                o => o,
            })
            .collect();
        assert_eq!(
            check(&allow_rules, user_rules.as_deref(), &own_mapped, v4),
            as_v4,
            "own addresses {own_mapped:?}"
        );
        for rule in &allow_rules {
            assert_eq!(
                rule.matches(&m),
                rule.matches(&v4),
                "{rule} on {m} and {v4}"
            );
        }
    }
    for rule in &allow_rules {
        let text = rule.to_string();
        if let Some((net, ports)) = v4_rule_parts(&text) {
            let (ip, len) = net.split_once('/').unwrap();
            let len: u32 = len.parse().unwrap();
            let spelled = format!("[::ffff:{ip}/{}]{ports}", len + 96);
            assert_eq!(
                Rule::parse(&spelled).as_ref(),
                Ok(rule),
                "{spelled:?} is not {text:?}"
            );
        }
    }

    // The rest: a raw list, each accepted rule checked on its own.
    let raw = String::from_utf8_lossy(r.rest()).into_owned();
    for word in raw.split_whitespace() {
        if let Ok(rule) = Rule::parse(word) {
            check_rule(&rule);
            if let IpAddr::V4(a) = canon(ip) {
                let m = SocketAddr::new(IpAddr::V6(mapped(a)), port);
                let v4 = SocketAddr::new(IpAddr::V4(a), port);
                assert_eq!(
                    rule.matches(&m),
                    rule.matches(&v4),
                    "{word:?} on {m} and {v4}"
                );
            }
        }
    }
}

/// `a.b.c.d/len` and `:ports` (or nothing) of a rule printed for an IPv4 network.
fn v4_rule_parts(text: &str) -> Option<(&str, &str)> {
    let (net, ports) = match text.find(':') {
        Some(i) => text.split_at(i),
        None => (text, ""),
    };
    let ip = net.split('/').next()?;
    ip.parse::<Ipv4Addr>().ok()?;
    Some((net, ports))
}
