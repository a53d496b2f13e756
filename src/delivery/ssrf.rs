//! The SSRF guard: which addresses outbound deliveries may connect to. Invariant: the decision is
//! made on the address actually connected to (resolved addresses through [`GuardedResolver`],
//! IP-literal URLs through [`Guard::check_url`]), so DNS rebinding cannot slip past it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;

/// The policy: non-public addresses are refused unless listed in `allow`.
#[derive(Debug, Clone, Default)]
pub struct Guard {
    allow: Vec<IpNet>,
}

/// Why a destination was refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("destination address {0} is not public (SSRF guard); list its network in outbound.allow_private_networks to allow it")]
pub struct Blocked(pub IpAddr);

impl Guard {
    pub fn new(allow: Vec<IpNet>) -> Self {
        Self { allow }
    }

    pub fn check(&self, ip: IpAddr) -> Result<(), Blocked> {
        let ip = canonical(ip);
        if self.allow.iter().any(|net| net.contains(&ip)) || is_public(ip) {
            Ok(())
        } else {
            Err(Blocked(ip))
        }
    }

    /// IP-literal URLs never reach a DNS resolver, so they are checked here.
    pub fn check_url(&self, url: &reqwest::Url) -> Result<(), Blocked> {
        match url.host() {
            Some(url::Host::Ipv4(v4)) => self.check(IpAddr::V4(v4)),
            Some(url::Host::Ipv6(v6)) => self.check(IpAddr::V6(v6)),
            _ => Ok(()),
        }
    }
}

/// An IPv4-mapped IPv6 address is judged as the IPv4 address it carries.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// Networks that are not globally reachable unicast, with the RFC that sets each aside (IANA's
/// special-purpose registries). Deliveries to them are refused unless allowed.
const NOT_PUBLIC_V4: &[(&str, &str)] = &[
    ("0.0.0.0/8", "RFC 791: this network"),
    ("10.0.0.0/8", "RFC 1918: private"),
    (
        "100.64.0.0/10",
        "RFC 6598: shared address space (carrier-grade NAT)",
    ),
    ("127.0.0.0/8", "RFC 1122: loopback"),
    (
        "169.254.0.0/16",
        "RFC 3927: link-local (cloud metadata at 169.254.169.254)",
    ),
    ("172.16.0.0/12", "RFC 1918: private"),
    ("192.0.0.0/24", "RFC 6890: IETF protocol assignments"),
    ("192.0.2.0/24", "RFC 5737: documentation (TEST-NET-1)"),
    ("192.88.99.0/24", "RFC 7526: 6to4 relay anycast"),
    ("192.168.0.0/16", "RFC 1918: private"),
    ("198.18.0.0/15", "RFC 2544: benchmarking"),
    ("198.51.100.0/24", "RFC 5737: documentation (TEST-NET-2)"),
    ("203.0.113.0/24", "RFC 5737: documentation (TEST-NET-3)"),
    ("224.0.0.0/4", "RFC 5771: multicast"),
    (
        "240.0.0.0/4",
        "RFC 1112: reserved (and RFC 919's limited broadcast)",
    ),
];

/// The same for IPv6. Prefixes that embed an IPv4 address are judged by that address instead
/// (see [`embedded_v4`]).
const NOT_PUBLIC_V6: &[(&str, &str)] = &[
    ("::/128", "RFC 4291: unspecified"),
    ("::1/128", "RFC 4291: loopback"),
    (
        "64:ff9b:1::/48",
        "RFC 8215: local-use IPv4/IPv6 translation",
    ),
    ("100::/64", "RFC 6666: discard-only"),
    (
        "2001::/23",
        "RFC 2928: IETF protocol assignments (Teredo, benchmarking, ORCHID)",
    ),
    ("2001:db8::/32", "RFC 3849: documentation"),
    ("3fff::/20", "RFC 9637: documentation"),
    ("5f00::/16", "RFC 9602: segment routing SIDs"),
    ("fc00::/7", "RFC 4193: unique local"),
    ("fe80::/10", "RFC 4291: link-local"),
    ("fec0::/10", "RFC 3879: site-local (deprecated)"),
    ("ff00::/8", "RFC 4291: multicast"),
];

/// The IPv4 address an IPv6 address carries, for the forms that carry one: IPv4-compatible
/// (`::a.b.c.d`, RFC 4291), IPv4-mapped (`::ffff:a.b.c.d`, RFC 4291), IPv4-translated
/// (`::ffff:0:a.b.c.d`, RFC 2765), NAT64 (`64:ff9b::a.b.c.d`, RFC 6052) and 6to4
/// (`2002:aabb:ccdd::`, RFC 3056).
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let low = || Ipv4Addr::from(((s[6] as u32) << 16) | s[7] as u32);
    match s {
        [0, 0, 0, 0, 0, 0, _, _] if !(s[6] == 0 && s[7] <= 1) => Some(low()),
        [0, 0, 0, 0, 0, 0xffff, _, _] => Some(low()),
        [0, 0, 0, 0, 0xffff, 0, _, _] => Some(low()),
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some(low()),
        [0x2002, hi, lo, ..] => Some(Ipv4Addr::from(((hi as u32) << 16) | lo as u32)),
        _ => None,
    }
}

fn listed(ip: IpAddr, table: &[(&str, &str)]) -> bool {
    table.iter().any(|(net, _)| {
        net.parse::<IpNet>()
            .expect("the tables hold valid networks")
            .contains(&ip)
    })
}

/// Whether an address is globally routable unicast: everything in the tables above (loopback,
/// private, link-local with cloud metadata, shared, documentation, multicast, reserved) is refused,
/// and an IPv6 address that carries an IPv4 one is judged as that.
pub fn is_public(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => !listed(IpAddr::V4(v4), NOT_PUBLIC_V4),
        IpAddr::V6(v6) => match embedded_v4(v6) {
            Some(v4) => is_public(IpAddr::V4(v4)),
            None => !listed(IpAddr::V6(v6), NOT_PUBLIC_V6),
        },
    }
}

/// A DNS resolver for reqwest that drops refused addresses, so a hostname that resolves to a
/// private address fails to connect instead of reaching it.
pub struct GuardedResolver {
    guard: Arc<Guard>,
}

impl GuardedResolver {
    pub fn new(guard: Arc<Guard>) -> Self {
        Self { guard }
    }
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let guard = self.guard.clone();
        Box::pin(async move {
            let host = name.as_str().to_string();
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut first_refusal = None;
            let allowed: Vec<SocketAddr> = addrs
                .into_iter()
                .filter(|a| match guard.check(a.ip()) {
                    Ok(()) => true,
                    Err(b) => {
                        first_refusal.get_or_insert(b);
                        false
                    }
                })
                .collect();
            if allowed.is_empty() {
                let err: Box<dyn std::error::Error + Send + Sync> = match first_refusal {
                    Some(b) => Box::new(b),
                    None => format!("{host}: no addresses").into(),
                };
                return Err(err);
            }
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn non_public_addresses_are_refused() {
        for a in [
            "127.0.0.1",
            "127.1.2.3",
            "0.0.0.0",
            "0.1.2.3",
            "10.0.0.1",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.255",
            "192.0.0.1",
            "192.0.2.1",
            "198.51.100.1",
            "203.0.113.1",
            "198.18.0.1",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "ff02::1",
            "2001:db8::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::",
            "::127.0.0.1",
            "fec0::1",
        ] {
            assert!(!is_public(ip(a)), "{a} judged public");
            assert!(Guard::default().check(ip(a)).is_err(), "{a} allowed");
        }
    }

    /// Every network in the tables, by its first, last and a middle address, with the RFC that
    /// reserves it; and each form that embeds an IPv4 address, carrying a private one.
    #[test]
    fn every_reserved_range_is_refused_with_its_rfc() {
        for (net, rfc) in NOT_PUBLIC_V4.iter().chain(NOT_PUBLIC_V6) {
            let net: IpNet = net.parse().unwrap();
            for a in [net.network(), net.broadcast()] {
                assert!(!is_public(a), "{a} ({rfc}) judged public");
            }
            assert!(rfc.starts_with("RFC "), "{net}: {rfc}");
        }
        for (a, why) in [
            ("64:ff9b:1::1", "RFC 8215 local-use NAT64"),
            ("64:ff9b:1:ffff::a00:1", "RFC 8215 local-use NAT64"),
            ("::ffff:0:7f00:1", "IPv4-translated 127.0.0.1 (RFC 2765)"),
            ("::ffff:0:a9fe:a9fe", "IPv4-translated 169.254.169.254"),
            ("::ffff:0:a00:1", "IPv4-translated 10.0.0.1"),
            ("64:ff9b::a00:1", "NAT64 of 10.0.0.1"),
            ("::a00:1", "IPv4-compatible 10.0.0.1"),
            ("2002:a9fe:a9fe::", "6to4 of 169.254.169.254"),
            ("2001:2::1", "RFC 5180 benchmarking"),
            ("3fff::1", "RFC 9637 documentation"),
        ] {
            assert!(!is_public(ip(a)), "{a} ({why}) judged public");
        }
        // The embedded forms of a public address pass.
        for a in ["::ffff:0:101:101", "64:ff9b::101:101", "2002:101:101::"] {
            assert!(is_public(ip(a)), "{a} (1.1.1.1) judged non-public");
        }
    }

    #[test]
    fn public_addresses_pass() {
        for a in [
            "1.1.1.1",
            "8.8.8.8",
            "93.184.216.34",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700::1111",
            "::ffff:1.1.1.1",
        ] {
            assert!(is_public(ip(a)), "{a} judged non-public");
        }
    }

    #[test]
    fn allow_list_exempts_only_its_networks() {
        let g = Guard::new(vec!["127.0.0.0/8".parse().unwrap()]);
        assert!(g.check(ip("127.0.0.1")).is_ok());
        assert!(g.check(ip("::ffff:127.0.0.1")).is_ok());
        assert!(g.check(ip("10.0.0.1")).is_err());
        assert!(g.check(ip("169.254.169.254")).is_err());
    }

    #[test]
    fn ip_literal_urls_are_checked() {
        let g = Guard::default();
        assert!(g
            .check_url(&"http://127.0.0.1:8080/x".parse().unwrap())
            .is_err());
        assert!(g.check_url(&"http://[::1]/x".parse().unwrap()).is_err());
        assert!(g
            .check_url(&"http://169.254.169.254/latest".parse().unwrap())
            .is_err());
        assert!(g.check_url(&"https://1.1.1.1/".parse().unwrap()).is_ok());
        // Names are left to the resolver.
        assert!(g
            .check_url(&"https://example.com/".parse().unwrap())
            .is_ok());
    }
}
