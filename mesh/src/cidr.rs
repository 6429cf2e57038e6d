//! IP prefixes (`10.0.0.0/8`, `fd00::/64`), as configuration, policies and exclusions
//! name them.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// An IP prefix. A bare address is a host prefix (/32 or /128).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    /// The network address (host bits may be set; they are ignored).
    pub addr: IpAddr,
    /// The prefix length.
    pub len: u8,
}

impl Cidr {
    /// A prefix, if `len` fits the address family.
    pub fn new(addr: IpAddr, len: u8) -> Option<Self> {
        (len <= max_len(addr)).then_some(Self { addr, len })
    }

    /// Does `ip` fall in this prefix? A v4-mapped IPv6 address matches IPv4 prefixes.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (ip, self.addr) {
            (IpAddr::V4(a), IpAddr::V4(n)) => {
                let mask = if self.len == 0 {
                    0
                } else {
                    u32::MAX << (32 - u32::from(self.len))
                };
                u32::from(a) & mask == u32::from(n) & mask
            }
            (IpAddr::V6(a), IpAddr::V6(n)) => {
                let mask = if self.len == 0 {
                    0
                } else {
                    u128::MAX << (128 - u32::from(self.len))
                };
                u128::from(a) & mask == u128::from(n) & mask
            }
            _ => false,
        }
    }
}

fn max_len(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { 32 } else { 128 }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (a, l) = s.split_once('/').map_or((s, None), |(a, l)| (a, Some(l)));
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or CIDR"))?;
        let len = match l {
            None => max_len(addr),
            Some(l) => l
                .parse::<u8>()
                .ok()
                .filter(|&l| l <= max_len(addr))
                .ok_or_else(|| format!("{s:?}: bad prefix length"))?,
        };
        Ok(Self { addr, len })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// As `addr/len`.
impl serde::Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        assert_eq!(
            "10.0.0.0/8".parse::<Cidr>().unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!("fd00::1".parse::<Cidr>().unwrap().len, 128);
        assert!(
            "10.0.0.0/33"
                .parse::<Cidr>()
                .unwrap_err()
                .contains("bad prefix length")
        );
        assert!("nonsense/8".parse::<Cidr>().is_err());
        assert_eq!(Cidr::new("10.0.0.0".parse().unwrap(), 33), None);
    }

    #[test]
    fn contains() {
        let c = |s: &str| s.parse::<Cidr>().unwrap();
        assert!(c("10.0.0.0/8").contains("10.1.2.3".parse().unwrap()));
        assert!(!c("10.0.0.0/8").contains("11.1.2.3".parse().unwrap()));
        assert!(c("0.0.0.0/0").contains("1.2.3.4".parse().unwrap()));
        assert!(c("10.0.0.0/8").contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(c("fd00::/8").contains("fd00::1".parse().unwrap()));
        assert!(!c("10.0.0.0/8").contains("fd00::1".parse().unwrap()));
    }
}
