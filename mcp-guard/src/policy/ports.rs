//! Port ranges as written in egress rules: `443`, `"8000-8100"` or `"*"`.

use std::borrow::Cow;
use std::fmt;
use std::ops::RangeInclusive;
use std::str::FromStr;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

const EXPECTED: &str =
    "a port number 1-65535, a range \"low-high\" such as \"8000-8100\", or \"*\"";

/// An inclusive range of TCP/UDP ports, never containing port 0 and never empty.
///
/// The fields are private so that every value upholds `1 <= first <= last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    first: u16,
    last: u16,
}

impl PortRange {
    /// Every port, 1-65535 (what `"*"` means).
    pub const ALL: PortRange = PortRange {
        first: 1,
        last: u16::MAX,
    };

    /// A range from `first` to `last` inclusive; `None` if it includes port 0 or is empty.
    pub fn new(first: u16, last: u16) -> Option<Self> {
        (first >= 1 && first <= last).then_some(Self { first, last })
    }

    /// A single port; `None` for port 0.
    pub fn single(port: u16) -> Option<Self> {
        Self::new(port, port)
    }

    pub fn first(&self) -> u16 {
        self.first
    }

    pub fn last(&self) -> u16 {
        self.last
    }

    pub fn contains(&self, port: u16) -> bool {
        self.range().contains(&port)
    }

    pub fn range(&self) -> RangeInclusive<u16> {
        self.first..=self.last
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// Why a port string was refused; its text is what the policy author sees.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortRangeError {
    #[error("port {0} is out of range: ports are 1-65535")]
    OutOfRange(u64),
    #[error("port range \"{0}\" is empty: the low port must not exceed the high port")]
    Reversed(String),
    #[error("invalid port \"{0}\": expected {EXPECTED}")]
    Syntax(String),
}

impl FromStr for PortRange {
    type Err = PortRangeError;

    /// Accepts `"*"`, `"N"` and `"LOW-HIGH"`, without spaces.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text == "*" {
            return Ok(Self::ALL);
        }
        let (low, high) = text.split_once('-').unwrap_or((text, text));
        let first = parse_port(low, text)?;
        let last = parse_port(high, text)?;
        Self::new(first, last).ok_or_else(|| PortRangeError::Reversed(text.to_owned()))
    }
}

/// Parses one bound of a range; `whole` is the full text, for the error message.
fn parse_port(bound: &str, whole: &str) -> Result<u16, PortRangeError> {
    // u64::from_str accepts a leading '+', which nobody means in a port.
    if bound.is_empty() || !bound.bytes().all(|b| b.is_ascii_digit()) {
        return Err(PortRangeError::Syntax(whole.to_owned()));
    }
    let number = bound
        .parse::<u64>()
        .map_err(|_| PortRangeError::Syntax(whole.to_owned()))?;
    port_from_number(number)
}

fn port_from_number(number: u64) -> Result<u16, PortRangeError> {
    u16::try_from(number)
        .ok()
        .filter(|port| *port != 0)
        .ok_or(PortRangeError::OutOfRange(number))
}

impl Serialize for PortRange {
    /// A single port as a number, anything wider as `"low-high"`, so that the output reads the
    /// way people write policies and parses back to the same value.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if self.first == self.last {
            serializer.serialize_u16(self.first)
        } else {
            serializer.collect_str(self)
        }
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(PortRangeVisitor)
    }
}

struct PortRangeVisitor;

impl Visitor<'_> for PortRangeVisitor {
    type Value = PortRange;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(EXPECTED)
    }

    fn visit_u64<E: de::Error>(self, number: u64) -> Result<PortRange, E> {
        let port = port_from_number(number).map_err(E::custom)?;
        Ok(PortRange {
            first: port,
            last: port,
        })
    }

    fn visit_i64<E: de::Error>(self, number: i64) -> Result<PortRange, E> {
        match u64::try_from(number) {
            Ok(number) => self.visit_u64(number),
            Err(_) => Err(E::custom(format!(
                "port {number} is out of range: ports are 1-65535"
            ))),
        }
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<PortRange, E> {
        text.parse().map_err(E::custom)
    }
}

impl JsonSchema for PortRange {
    fn schema_name() -> Cow<'static, str> {
        "PortRange".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A port (1-65535), an inclusive range \"low-high\", or \"*\" for every port.",
            "oneOf": [
                { "type": "integer", "minimum": 1, "maximum": 65535 },
                { "type": "string", "pattern": "^(\\*|[0-9]{1,5}(-[0-9]{1,5})?)$" }
            ]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_json(json: &str) -> Result<PortRange, String> {
        serde_json::from_str(json).map_err(|e| e.to_string())
    }

    #[test]
    fn a_number_is_a_single_port() {
        assert_eq!(parse_json("443").unwrap(), PortRange::single(443).unwrap());
    }

    #[test]
    fn a_string_range_is_inclusive() {
        let range = parse_json("\"8000-8100\"").unwrap();
        assert_eq!(range.range(), 8000..=8100);
        assert!(range.contains(8000) && range.contains(8100) && !range.contains(8101));
    }

    #[test]
    fn a_single_port_may_be_a_string() {
        assert_eq!(
            parse_json("\"53\"").unwrap(),
            PortRange::single(53).unwrap()
        );
    }

    #[test]
    fn star_means_every_port() {
        assert_eq!(parse_json("\"*\"").unwrap(), PortRange::ALL);
        assert_eq!(PortRange::ALL.range(), 1..=65535);
    }

    #[test]
    fn a_range_of_one_port_is_accepted() {
        assert_eq!(
            parse_json("\"80-80\"").unwrap(),
            PortRange::single(80).unwrap()
        );
    }

    #[test]
    fn port_zero_and_ports_above_65535_are_refused() {
        for json in ["0", "65536", "-1", "\"0-10\"", "\"10-70000\""] {
            let error = parse_json(json).unwrap_err();
            assert!(error.contains("out of range"), "{json}: {error}");
        }
    }

    #[test]
    fn a_reversed_range_is_refused() {
        let error = parse_json("\"9000-8000\"").unwrap_err();
        assert!(error.contains("is empty"), "{error}");
    }

    #[test]
    fn malformed_strings_are_refused() {
        for json in [
            "\"\"",
            "\"http\"",
            "\"80-\"",
            "\"-80\"",
            "\"1-2-3\"",
            "\" 80\"",
            "\"+80\"",
        ] {
            let error = parse_json(json).unwrap_err();
            assert!(error.contains("invalid port"), "{json}: {error}");
        }
    }

    #[test]
    fn other_json_types_are_refused() {
        for json in ["true", "1.5", "[80]", "null"] {
            let error = parse_json(json).unwrap_err();
            assert!(error.contains("expected a port number"), "{json}: {error}");
        }
    }

    #[test]
    fn serialisation_round_trips() {
        for json in ["443", "\"8000-8100\"", "\"1-65535\""] {
            let range = parse_json(json).unwrap();
            assert_eq!(serde_json::to_string(&range).unwrap(), json);
        }
    }
}
