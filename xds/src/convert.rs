//! The wire form of shared types: conversions between `ambit.v1` messages and the
//! types the control plane and the agents work with. The control plane encodes with
//! these functions and the agents decode with them, so both sides read the bytes the
//! same way.

use std::net::IpAddr;

use ambit_identity::IdentityError;
use ambit_policy::{
    Action, Authorization, Cidr, Destination, Labels, PrincipalPattern, Rule, Source,
};

use crate::ambit;

/// Why a resource could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The bytes are not the message they claim to be.
    #[error("not a {message}: {reason}")]
    Protobuf {
        /// The message type expected.
        message: &'static str,
        /// What prost said.
        reason: String,
    },
    /// An address of neither 4 nor 16 bytes.
    #[error("an IP address of {0} bytes")]
    IpLength(usize),
    /// A prefix length the address family cannot have.
    #[error("CIDR {address}/{length} has a bad prefix length")]
    PrefixLength {
        /// The address.
        address: IpAddr,
        /// The length given.
        length: u32,
    },
    /// A port outside 1-65535.
    #[error("bad port {0}")]
    Port(u32),
    /// An enum value this version does not know.
    #[error("unknown {field} {value}")]
    UnknownEnum {
        /// The field.
        field: &'static str,
        /// Its value.
        value: i32,
    },
    /// A malformed identity.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// A malformed principal pattern.
    #[error("{0}")]
    Principal(String),
    /// Any other broken rule about a field.
    #[error("{field}: {problem}")]
    Field {
        /// The field.
        field: &'static str,
        /// What is wrong.
        problem: String,
    },
}

impl DecodeError {
    /// A prost decoding error for `message`.
    pub fn protobuf(message: &'static str, e: prost::DecodeError) -> Self {
        Self::Protobuf {
            message,
            reason: e.to_string(),
        }
    }
}

/// An address as the protos carry it: 4 or 16 bytes.
pub fn ip_to_bytes(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// Reads a 4- or 16-byte address.
pub fn ip_from_bytes(b: &[u8]) -> Result<IpAddr, DecodeError> {
    if let Ok(a) = <[u8; 4]>::try_from(b) {
        Ok(IpAddr::from(a))
    } else if let Ok(a) = <[u8; 16]>::try_from(b) {
        Ok(IpAddr::from(a))
    } else {
        Err(DecodeError::IpLength(b.len()))
    }
}

/// A port in 1-65535.
pub fn port_from_u32(p: u32) -> Result<u16, DecodeError> {
    u16::try_from(p)
        .ok()
        .filter(|&p| p > 0)
        .ok_or(DecodeError::Port(p))
}

/// Encodes a policy.
pub fn authorization_to_proto(p: &Authorization) -> ambit::Authorization {
    let cidrs = |v: &[Cidr]| {
        v.iter()
            .map(|c| ambit::Cidr {
                address: ip_to_bytes(&c.addr),
                length: c.len.into(),
            })
            .collect()
    };
    let patterns = |v: &[PrincipalPattern]| v.iter().map(ToString::to_string).collect();
    let ports = |v: &[u16]| v.iter().map(|&p| u32::from(p)).collect();
    ambit::Authorization {
        name: p.name.clone(),
        namespace: p.namespace.clone(),
        action: match p.action {
            Action::Allow => ambit::authorization::Action::Allow,
            Action::Deny => ambit::authorization::Action::Deny,
            Action::RateLimit(_) => ambit::authorization::Action::RateLimit,
        } as i32,
        rate: match p.action {
            Action::RateLimit(r) => Some(ambit::ConnectionRate {
                connections: r.connections,
                per_seconds: r.per_seconds,
                burst: r.burst,
            }),
            _ => None,
        },
        namespace_wide: p.selector.is_none(),
        selector: p.selector.clone().unwrap_or_default().into_iter().collect(),
        rules: p
            .rules
            .iter()
            .map(|r| ambit::Rule {
                from: r
                    .from
                    .iter()
                    .map(|s| ambit::SourceMatch {
                        principals: patterns(&s.principals),
                        not_principals: patterns(&s.not_principals),
                        namespaces: s.namespaces.clone(),
                        not_namespaces: s.not_namespaces.clone(),
                        ip_blocks: cidrs(&s.ip_blocks),
                        not_ip_blocks: cidrs(&s.not_ip_blocks),
                    })
                    .collect(),
                to: r
                    .to
                    .iter()
                    .map(|d| ambit::DestinationMatch {
                        ports: ports(&d.ports),
                        not_ports: ports(&d.not_ports),
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// Decodes and validates a policy.
pub fn authorization_from_proto(a: ambit::Authorization) -> Result<Authorization, DecodeError> {
    let action = match ambit::authorization::Action::try_from(a.action) {
        Ok(ambit::authorization::Action::Allow) => Action::Allow,
        Ok(ambit::authorization::Action::Deny) => Action::Deny,
        Ok(ambit::authorization::Action::RateLimit) => match a.rate {
            Some(r) if r.connections > 0 && r.per_seconds > 0 && r.burst > 0 => {
                Action::RateLimit(ambit_policy::ConnectionRate {
                    connections: r.connections,
                    per_seconds: r.per_seconds,
                    burst: r.burst,
                })
            }
            _ => {
                return Err(DecodeError::Field {
                    field: "rate",
                    problem:
                        "RATE_LIMIT needs a rate with connections, per_seconds and burst over 0"
                            .into(),
                });
            }
        },
        Err(_) => {
            return Err(DecodeError::UnknownEnum {
                field: "action",
                value: a.action,
            });
        }
    };
    if a.namespace_wide && !a.selector.is_empty() {
        return Err(DecodeError::Field {
            field: "selector",
            problem: "set on a namespace-wide policy".into(),
        });
    }
    let cidrs = |v: Vec<ambit::Cidr>| -> Result<Vec<Cidr>, DecodeError> {
        v.into_iter()
            .map(|c| {
                let address = ip_from_bytes(&c.address)?;
                u8::try_from(c.length)
                    .ok()
                    .and_then(|l| Cidr::new(address, l))
                    .ok_or(DecodeError::PrefixLength {
                        address,
                        length: c.length,
                    })
            })
            .collect()
    };
    let patterns = |v: Vec<String>| -> Result<Vec<PrincipalPattern>, DecodeError> {
        v.iter()
            .map(|p| PrincipalPattern::parse(p).map_err(DecodeError::Principal))
            .collect()
    };
    let ports = |v: Vec<u32>| -> Result<Vec<u16>, DecodeError> {
        v.into_iter().map(port_from_u32).collect()
    };
    let mut rules = Vec::with_capacity(a.rules.len());
    for r in a.rules {
        let mut from = Vec::with_capacity(r.from.len());
        for f in r.from {
            from.push(Source {
                principals: patterns(f.principals)?,
                not_principals: patterns(f.not_principals)?,
                namespaces: f.namespaces,
                not_namespaces: f.not_namespaces,
                ip_blocks: cidrs(f.ip_blocks)?,
                not_ip_blocks: cidrs(f.not_ip_blocks)?,
            });
        }
        let mut to = Vec::with_capacity(r.to.len());
        for t in r.to {
            to.push(Destination {
                ports: ports(t.ports)?,
                not_ports: ports(t.not_ports)?,
            });
        }
        rules.push(Rule { from, to });
    }
    Ok(Authorization {
        name: a.name,
        namespace: a.namespace,
        action,
        selector: (!a.namespace_wide).then(|| a.selector.into_iter().collect::<Labels>()),
        rules,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_round_trip() {
        let p = Authorization {
            name: "p".into(),
            namespace: "shop".into(),
            action: Action::Deny,
            selector: Some([("app".to_string(), "web".to_string())].into()),
            rules: vec![Rule {
                from: vec![Source {
                    principals: vec![PrincipalPattern::parse("*/sa/web").unwrap()],
                    ip_blocks: vec!["10.0.0.0/8".parse().unwrap()],
                    not_namespaces: vec!["legacy".into()],
                    ..Default::default()
                }],
                to: vec![Destination {
                    ports: vec![8080],
                    not_ports: vec![9090],
                }],
            }],
        };
        assert_eq!(
            authorization_from_proto(authorization_to_proto(&p)).unwrap(),
            p
        );
        let wide = Authorization {
            selector: None,
            ..p.clone()
        };
        assert_eq!(
            authorization_from_proto(authorization_to_proto(&wide)).unwrap(),
            wide
        );
    }

    #[test]
    fn bad_fields_are_refused_with_a_reason() {
        let mut a = authorization_to_proto(&Authorization {
            name: "p".into(),
            namespace: "shop".into(),
            action: Action::Allow,
            selector: None,
            rules: vec![Rule::default()],
        });
        a.rules[0].from.push(ambit::SourceMatch {
            ip_blocks: vec![ambit::Cidr {
                address: vec![10, 0, 0, 0],
                length: 33,
            }],
            ..Default::default()
        });
        let e = authorization_from_proto(a.clone()).unwrap_err();
        assert_eq!(e.to_string(), "CIDR 10.0.0.0/33 has a bad prefix length");
        a.rules[0].from[0].ip_blocks.clear();
        a.rules[0].from[0].principals = vec!["spiffe://td/ns/a/sa/b".into()];
        let e = authorization_from_proto(a.clone()).unwrap_err();
        assert!(
            e.to_string().contains("without the spiffe:// scheme"),
            "{e}"
        );
        a.rules[0].from.clear();
        a.rules[0].to.push(ambit::DestinationMatch {
            ports: vec![70000],
            not_ports: vec![],
        });
        assert_eq!(
            authorization_from_proto(a.clone()).unwrap_err().to_string(),
            "bad port 70000"
        );
        a.rules.clear();
        a.action = 7;
        assert_eq!(
            authorization_from_proto(a).unwrap_err().to_string(),
            "unknown action 7"
        );
        assert!(ip_from_bytes(&[1, 2, 3]).is_err());
    }
}
