//! Who a request came from when the HTTP front sits behind proxies: RFC 7239 `Forwarded`
//! (its `for=` parameters) or, without it, `X-Forwarded-For`, believed only from the policy's
//! `daemon.trusted_proxies`.
//!
//! Each proxy appends the address it got the request from, so the header's right end is what
//! the nearest proxy saw and its left end is whatever the client claimed. Walking from the
//! right, every entry a trusted proxy wrote is passed over; the first address that is not a
//! trusted proxy is the client. Anything left of it could have been written by the client and
//! is ignored. An entry that is not an address stops the walk at the last trusted proxy
//! reached: what lies beyond it cannot be read, so the proxy is the best answer.

use std::net::{IpAddr, SocketAddr};

use axum::http::HeaderMap;
use ipnet::IpNet;

const X_FORWARDED_FOR: &str = "x-forwarded-for";
const FORWARDED: &str = "forwarded";

/// The address a request from `peer` (the connection's own address) came from.
pub fn client_address(peer: IpAddr, trusted_proxies: &[IpNet], headers: &HeaderMap) -> IpAddr {
    let peer = peer.to_canonical();
    let trusted = |address: &IpAddr| trusted_proxies.iter().any(|net| net.contains(address));
    if !trusted(&peer) {
        return peer;
    }
    let entries = if headers.contains_key(FORWARDED) {
        forwarded_for(headers)
    } else {
        list_of(headers, X_FORWARDED_FOR)
    };
    let mut client = peer;
    for entry in entries.iter().rev() {
        let Some(address) = address_in(entry) else {
            return client;
        };
        client = address;
        if !trusted(&address) {
            return address;
        }
    }
    client
}

/// The comma-separated elements of every `name` header, in order (several headers read as one
/// list).
fn list_of<'a>(headers: &'a HeaderMap, name: &str) -> Vec<&'a str> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .collect()
}

/// The `for=` value of each element of `Forwarded` (RFC 7239 section 4:
/// `for=192.0.2.60;proto=http, for="[2001:db8::17]:4711"`). An element without one yields an
/// empty entry, which stops the walk like any entry that is not an address.
fn forwarded_for(headers: &HeaderMap) -> Vec<&str> {
    list_of(headers, FORWARDED)
        .into_iter()
        .map(|element| {
            element
                .split(';')
                .filter_map(|pair| pair.split_once('='))
                .find(|(name, _)| name.trim().eq_ignore_ascii_case("for"))
                .map_or("", |(_, value)| value.trim().trim_matches('"'))
        })
        .collect()
}

/// The address of one entry: `192.0.2.1`, `2001:db8::1`, `[2001:db8::1]`, or one with a port
/// (`192.0.2.1:4711`, `[2001:db8::1]:4711`).
fn address_in(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    let unbracketed = entry
        .strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
        .unwrap_or(entry);
    unbracketed
        .parse::<IpAddr>()
        .or_else(|_| entry.parse::<SocketAddr>().map(|socket| socket.ip()))
        .ok()
        .map(|address| address.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn nets(texts: &[&str]) -> Vec<IpNet> {
        texts.iter().map(|t| t.parse().unwrap()).collect()
    }

    fn forwarded(values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(X_FORWARDED_FOR, HeaderValue::from_str(value).unwrap());
        }
        headers
    }

    #[test]
    fn without_trusted_proxies_the_header_is_ignored() {
        let headers = forwarded(&["198.51.100.9"]);
        assert_eq!(
            client_address(ip("10.0.0.5"), &[], &headers),
            ip("10.0.0.5")
        );
        // Nor from a peer that is not one of them.
        let proxies = nets(&["10.0.0.0/8"]);
        assert_eq!(
            client_address(ip("192.0.2.1"), &proxies, &headers),
            ip("192.0.2.1")
        );
    }

    #[test]
    fn the_right_most_address_no_trusted_proxy_wrote_is_the_client() {
        let proxies = nets(&["10.0.0.0/8", "2001:db8::/32"]);
        let peer = ip("10.0.0.5");
        // The client forged the left-most entry; the proxies appended the rest.
        let headers = forwarded(&["203.0.113.66, 198.51.100.9", "10.1.2.3"]);
        assert_eq!(client_address(peer, &proxies, &headers), ip("198.51.100.9"));
        let headers = forwarded(&["[2001:db8::7]:443, 198.51.100.9:5000, 2001:db8::1"]);
        assert_eq!(client_address(peer, &proxies, &headers), ip("198.51.100.9"));
    }

    #[test]
    fn unreadable_or_missing_entries_leave_the_last_trusted_hop() {
        let proxies = nets(&["10.0.0.0/8"]);
        let peer = ip("10.0.0.5");
        assert_eq!(client_address(peer, &proxies, &HeaderMap::new()), peer);
        let headers = forwarded(&["198.51.100.9, unknown, 10.1.2.3"]);
        assert_eq!(client_address(peer, &proxies, &headers), ip("10.1.2.3"));
        // Only trusted proxies all the way: the farthest of them.
        let headers = forwarded(&["10.9.9.9, 10.1.2.3"]);
        assert_eq!(client_address(peer, &proxies, &headers), ip("10.9.9.9"));
    }

    #[test]
    fn rfc_7239_forwarded_is_read_first() {
        let proxies = nets(&["10.0.0.0/8"]);
        let peer = ip("10.0.0.5");
        let mut headers = HeaderMap::new();
        headers.append(
            FORWARDED,
            HeaderValue::from_static(
                "for=203.0.113.66, For=\"[2001:db8:cafe::17]:4711\";proto=https, for=10.1.2.3;by=10.0.0.5",
            ),
        );
        // X-Forwarded-For is not read when Forwarded is there.
        headers.append(X_FORWARDED_FOR, HeaderValue::from_static("198.51.100.9"));
        assert_eq!(
            client_address(peer, &proxies, &headers),
            ip("2001:db8:cafe::17")
        );
        let mut headers = HeaderMap::new();
        headers.append(FORWARDED, HeaderValue::from_static("for=\"[2001:db8::1]\""));
        assert_eq!(client_address(peer, &proxies, &headers), ip("2001:db8::1"));
        // An obfuscated or missing `for` stops the walk at the last trusted hop.
        for value in [
            "for=_hidden, for=10.1.2.3",
            "proto=https, for=10.1.2.3",
            "for=unknown",
        ] {
            let mut headers = HeaderMap::new();
            headers.append(FORWARDED, HeaderValue::from_static(value));
            let expected = if value.contains("10.1.2.3") {
                ip("10.1.2.3")
            } else {
                peer
            };
            assert_eq!(
                client_address(peer, &proxies, &headers),
                expected,
                "{value}"
            );
        }
    }

    #[test]
    fn ipv4_mapped_addresses_count_as_ipv4() {
        let proxies = nets(&["127.0.0.1/32"]);
        let headers = forwarded(&["::ffff:198.51.100.9"]);
        assert_eq!(
            client_address(ip("::ffff:127.0.0.1"), &proxies, &headers),
            ip("198.51.100.9")
        );
    }
}
