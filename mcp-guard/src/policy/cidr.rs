//! Address prefixes as written in egress rules: `"10.0.0.0/8"`, `"2001:db8::/32"`, or a bare
//! address meaning that one host.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer};

/// Why a `cidr` value was refused; its text is what the policy author sees.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error(
        "\"{text}\" has host bits set: write {network} for the whole network, \
         or {host} for that one address"
    )]
    HostBitsSet {
        text: String,
        network: IpNet,
        host: IpNet,
    },
    #[error(
        "invalid CIDR \"{0}\": expected an address prefix such as \"10.0.0.0/8\" or \
         \"2001:db8::/32\", or a bare address such as \"192.0.2.1\""
    )]
    Syntax(String),
}

/// Parses a prefix or a bare address (a /32 or /128).
///
/// A prefix with host bits set is refused rather than silently truncated: "10.0.0.1/8" is as
/// likely a typo for "10.0.0.1/32" as a request for the whole /8, and guessing wrong widens
/// what the server may reach.
pub fn parse_cidr(text: &str) -> Result<IpNet, CidrError> {
    if let Ok(address) = text.parse::<IpAddr>() {
        return Ok(IpNet::from(address));
    }
    let net: IpNet = text
        .parse()
        .map_err(|_| CidrError::Syntax(text.to_owned()))?;
    if net.trunc() != net {
        return Err(CidrError::HostBitsSet {
            text: text.to_owned(),
            network: net.trunc(),
            host: IpNet::from(net.addr()),
        });
    }
    Ok(net)
}

/// `deserialize_with` helper for `Option<IpNet>` fields written with [`parse_cidr`]'s syntax.
pub fn deserialize_optional<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<IpNet>, D::Error> {
    let Some(text) = Option::<String>::deserialize(deserializer)? else {
        return Ok(None);
    };
    parse_cidr(&text)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

/// `deserialize_with` helper for `Vec<IpNet>` fields written with [`parse_cidr`]'s syntax.
pub fn deserialize_list<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<IpNet>, D::Error> {
    Vec::<String>::deserialize(deserializer)?
        .iter()
        .map(|text| parse_cidr(text).map_err(serde::de::Error::custom))
        .collect()
}

/// True when every address in `net` is an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`).
///
/// The kernel programs judge such destinations as the IPv4 address they carry, so a rule
/// written this way would never match anything.
pub fn is_ipv4_mapped(net: &IpNet) -> bool {
    match net {
        IpNet::V4(_) => false,
        IpNet::V6(v6) => v6.prefix_len() >= 96 && v6.network().to_ipv4_mapped().is_some(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_is_kept() {
        assert_eq!(parse_cidr("10.0.0.0/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(
            parse_cidr("2001:db8::/32").unwrap().to_string(),
            "2001:db8::/32"
        );
    }

    #[test]
    fn a_bare_ipv4_address_is_a_slash_32() {
        assert_eq!(
            parse_cidr("127.0.0.53").unwrap().to_string(),
            "127.0.0.53/32"
        );
    }

    #[test]
    fn a_bare_ipv6_address_is_a_slash_128() {
        assert_eq!(parse_cidr("::1").unwrap().to_string(), "::1/128");
    }

    #[test]
    fn host_bits_are_refused_with_both_readings_offered() {
        let message = parse_cidr("10.0.0.1/8").unwrap_err().to_string();
        assert_eq!(
            message,
            "\"10.0.0.1/8\" has host bits set: write 10.0.0.0/8 for the whole network, \
             or 10.0.0.1/32 for that one address"
        );
    }

    #[test]
    fn garbage_is_refused() {
        for text in ["", "example.com", "10.0.0.0/33", "10.0.0/8", "10.0.0.0/"] {
            assert!(
                matches!(parse_cidr(text), Err(CidrError::Syntax(_))),
                "{text}"
            );
        }
    }

    #[test]
    fn ipv4_mapped_prefixes_are_recognised() {
        assert!(is_ipv4_mapped(&parse_cidr("::ffff:10.0.0.0/104").unwrap()));
        assert!(is_ipv4_mapped(&parse_cidr("::ffff:192.0.2.1").unwrap()));
        assert!(!is_ipv4_mapped(&parse_cidr("::/0").unwrap()));
        assert!(!is_ipv4_mapped(&parse_cidr("2001:db8::/32").unwrap()));
        assert!(!is_ipv4_mapped(&parse_cidr("10.0.0.0/8").unwrap()));
    }
}
