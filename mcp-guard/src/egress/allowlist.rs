//! Compiles a server's egress rules (address prefixes × port ranges × protocols) into the
//! entries of the kernel's LPM trie.
//!
//! The trie returns only the longest prefix that matches a destination, so a rule on a short
//! prefix would be hidden by any longer prefix inside it. Each entry therefore carries its own
//! rules plus those of every shorter prefix that covers it, and the kernel needs one lookup.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::ops::RangeInclusive;

use aya::maps::lpm_trie::Key;
use ipnet::IpNet;
use mcp_guard_common::{
    AllowKey, AllowValue, MAX_PORT_RULES, POLICY_ID_BITS, PROTO_TCP, PROTO_UDP, PortRule,
    V4_MAPPED_PREFIX_BITS,
};

/// One allowed destination: a prefix, a port range and protocols, from one policy rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowEntry {
    pub net: IpNet,
    pub ports: RangeInclusive<u16>,
    pub tcp: bool,
    pub udp: bool,
    pub rule_id: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AllowListError {
    #[error(
        "{count} port rules apply to {prefix} (its own and those of covering prefixes); the kernel holds at most {max} per prefix: merge port ranges or split the rules"
    )]
    TooManyPortRules {
        prefix: String,
        count: usize,
        max: usize,
    },
}

/// A normalised prefix: IPv4 as IPv4-mapped IPv6, host bits cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Prefix {
    addr: [u8; 16],
    len: u8,
}

impl Prefix {
    fn from_net(net: &IpNet) -> Prefix {
        match net {
            IpNet::V4(v4) => Prefix {
                addr: v4.network().to_ipv6_mapped().octets(),
                len: V4_MAPPED_PREFIX_BITS as u8 + v4.prefix_len(),
            },
            IpNet::V6(v6) => Prefix {
                addr: v6.network().octets(),
                len: v6.prefix_len(),
            },
        }
    }

    fn truncated(&self, len: u8) -> Prefix {
        let mut addr = self.addr;
        for (i, byte) in addr.iter_mut().enumerate() {
            let first_bit = i as u32 * 8;
            let keep = (len as u32).saturating_sub(first_bit).min(8);
            *byte &= if keep == 0 { 0 } else { 0xffu8 << (8 - keep) };
        }
        Prefix { addr, len }
    }

    fn display(&self) -> String {
        let v6 = std::net::Ipv6Addr::from(self.addr);
        match v6.to_ipv4_mapped() {
            Some(v4) if self.len as u32 >= V4_MAPPED_PREFIX_BITS => {
                format!("{}/{}", v4, self.len as u32 - V4_MAPPED_PREFIX_BITS)
            }
            _ => format!("{}/{}", IpAddr::V6(v6), self.len),
        }
    }
}

/// The trie entries for one policy id.
pub fn compile(
    policy_id: u32,
    entries: &[AllowEntry],
) -> Result<Vec<(Key<AllowKey>, AllowValue)>, AllowListError> {
    let own_rules = rules_by_prefix(entries);
    let mut compiled = Vec::with_capacity(own_rules.len());
    for prefix in own_rules.keys() {
        let rules = rules_with_covering_prefixes(prefix, &own_rules);
        if rules.len() > MAX_PORT_RULES {
            return Err(AllowListError::TooManyPortRules {
                prefix: prefix.display(),
                count: rules.len(),
                max: MAX_PORT_RULES,
            });
        }
        compiled.push((trie_key(policy_id, prefix), allow_value(&rules)));
    }
    Ok(compiled)
}

/// The key that finds every entry of `policy_id` covering `addr` (a full-length lookup key).
pub fn lookup_key(policy_id: u32, addr: IpAddr) -> Key<AllowKey> {
    let octets = match addr {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    };
    Key::new(
        POLICY_ID_BITS + 128,
        AllowKey {
            policy_id_be: policy_id.to_be(),
            addr: octets,
        },
    )
}

fn rules_by_prefix(entries: &[AllowEntry]) -> BTreeMap<Prefix, Vec<PortRule>> {
    let mut by_prefix: BTreeMap<Prefix, Vec<PortRule>> = BTreeMap::new();
    for entry in entries {
        let rule = port_rule(entry);
        let rules = by_prefix.entry(Prefix::from_net(&entry.net)).or_default();
        if !rules.iter().any(|r| same_ports(r, &rule)) {
            rules.push(rule);
        }
    }
    by_prefix
}

fn rules_with_covering_prefixes(
    prefix: &Prefix,
    own_rules: &BTreeMap<Prefix, Vec<PortRule>>,
) -> Vec<PortRule> {
    let mut rules: Vec<PortRule> = own_rules[prefix].clone();
    // Longest covering prefix first, so the most specific rule is reported when several match.
    for len in (0..prefix.len).rev() {
        if let Some(covering) = own_rules.get(&prefix.truncated(len)) {
            for rule in covering {
                if !rules.iter().any(|r| same_ports(r, rule)) {
                    rules.push(*rule);
                }
            }
        }
    }
    rules
}

fn same_ports(a: &PortRule, b: &PortRule) -> bool {
    a.port_lo == b.port_lo && a.port_hi == b.port_hi && a.protocols == b.protocols
}

fn port_rule(entry: &AllowEntry) -> PortRule {
    let mut protocols = 0;
    if entry.tcp {
        protocols |= PROTO_TCP;
    }
    if entry.udp {
        protocols |= PROTO_UDP;
    }
    PortRule {
        port_lo: *entry.ports.start(),
        port_hi: *entry.ports.end(),
        protocols,
        _pad: [0; 3],
        rule_id: entry.rule_id,
    }
}

fn trie_key(policy_id: u32, prefix: &Prefix) -> Key<AllowKey> {
    Key::new(
        POLICY_ID_BITS + prefix.len as u32,
        AllowKey {
            policy_id_be: policy_id.to_be(),
            addr: prefix.addr,
        },
    )
}

fn allow_value(rules: &[PortRule]) -> AllowValue {
    let mut value = AllowValue::EMPTY;
    value.count = rules.len() as u32;
    value.rules[..rules.len()].copy_from_slice(rules);
    value
}

/// What the kernel would decide for one destination, computed from compiled entries the way
/// the kernel program does (longest prefix, first matching port rule). Used by tests and by
/// `policy check` to explain a verdict without a kernel.
pub fn evaluate(
    compiled: &[(Key<AllowKey>, AllowValue)],
    addr: IpAddr,
    port: u16,
    udp: bool,
) -> Option<u32> {
    let target = lookup_key(0, addr).data().addr;
    let protocol = if udp { PROTO_UDP } else { PROTO_TCP };
    let by_prefix: HashMap<Prefix, &AllowValue> = compiled
        .iter()
        .map(|(key, value)| {
            let prefix = Prefix {
                addr: key.data().addr,
                len: (key.prefix_len() - POLICY_ID_BITS) as u8,
            };
            (prefix, value)
        })
        .collect();
    let target = Prefix {
        addr: target,
        len: 128,
    };
    (0..=128u8).rev().find_map(|len| {
        let value = by_prefix.get(&target.truncated(len))?;
        let rules = &value.rules[..value.count as usize];
        Some(
            rules
                .iter()
                .find(|r| r.protocols & protocol != 0 && (r.port_lo..=r.port_hi).contains(&port))
                .map(|r| r.rule_id),
        )
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(net: &str, ports: RangeInclusive<u16>, udp: bool, rule_id: u32) -> AllowEntry {
        AllowEntry {
            net: net.parse().unwrap(),
            ports,
            tcp: !udp,
            udp,
            rule_id,
        }
    }

    fn verdict(entries: &[AllowEntry], addr: &str, port: u16, udp: bool) -> Option<u32> {
        let compiled = compile(7, entries).unwrap();
        evaluate(&compiled, addr.parse().unwrap(), port, udp)
    }

    #[test]
    fn ipv4_prefix_admits_its_ports_only() {
        let rules = [entry("10.0.0.0/8", 443..=443, false, 1)];
        assert_eq!(verdict(&rules, "10.1.2.3", 443, false), Some(1));
        assert_eq!(verdict(&rules, "10.1.2.3", 80, false), None);
        assert_eq!(verdict(&rules, "11.1.2.3", 443, false), None);
        assert_eq!(verdict(&rules, "10.1.2.3", 443, true), None);
    }

    #[test]
    fn ipv4_rules_cover_the_mapped_ipv6_form() {
        let rules = [entry("127.0.0.1/32", 8080..=8080, false, 3)];
        assert_eq!(verdict(&rules, "::ffff:127.0.0.1", 8080, false), Some(3));
        assert_eq!(verdict(&rules, "::1", 8080, false), None);
    }

    #[test]
    fn longer_prefix_keeps_the_rules_of_the_prefix_covering_it() {
        let rules = [
            entry("10.0.0.0/8", 80..=80, false, 1),
            entry("10.1.0.0/16", 443..=443, false, 2),
        ];
        assert_eq!(verdict(&rules, "10.1.9.9", 80, false), Some(1));
        assert_eq!(verdict(&rules, "10.1.9.9", 443, false), Some(2));
        assert_eq!(verdict(&rules, "10.2.9.9", 443, false), None);
    }

    #[test]
    fn most_specific_rule_is_reported_first() {
        let rules = [
            entry("0.0.0.0/0", 1..=65535, false, 1),
            entry("192.168.1.1/32", 22..=22, false, 2),
        ];
        assert_eq!(verdict(&rules, "192.168.1.1", 22, false), Some(2));
        assert_eq!(verdict(&rules, "192.168.1.2", 22, false), Some(1));
    }

    #[test]
    fn ipv6_prefixes_and_port_ranges() {
        let rules = [entry("2001:db8::/32", 8000..=8100, true, 4)];
        assert_eq!(verdict(&rules, "2001:db8::1", 8050, true), Some(4));
        assert_eq!(verdict(&rules, "2001:db8::1", 8101, true), None);
        assert_eq!(verdict(&rules, "2001:db9::1", 8050, true), None);
    }

    #[test]
    fn keys_carry_policy_id_and_bit_length() {
        let compiled = compile(9, &[entry("10.0.0.0/8", 1..=1, false, 1)]).unwrap();
        let (key, value) = &compiled[0];
        assert_eq!(key.prefix_len(), 32 + 96 + 8);
        assert_eq!(u32::from_be(key.data().policy_id_be), 9);
        assert_eq!(value.count, 1);
    }

    #[test]
    fn too_many_rules_on_one_prefix_is_an_error_naming_it() {
        let rules: Vec<_> = (0..=MAX_PORT_RULES as u16)
            .map(|p| entry("10.0.0.1/32", (p + 1)..=(p + 1), false, p as u32))
            .collect();
        let Err(err) = compile(1, &rules) else {
            panic!("17 port rules on one prefix compiled");
        };
        assert!(err.to_string().contains("10.0.0.1/32"), "{err}");
    }

    #[test]
    fn duplicate_port_rules_are_stored_once() {
        let rules = [
            entry("10.0.0.1/32", 53..=53, true, 1),
            entry("10.0.0.1/32", 53..=53, true, 2),
        ];
        let compiled = compile(1, &rules).unwrap();
        assert_eq!(compiled[0].1.count, 1);
    }
}
