//! A budget of refused bearer tokens per client address.
//!
//! Checking an RS256 or ES256 signature costs a fifth of a millisecond of CPU, and a token a
//! sender forges with a trusted issuer's `iss`, `kid` and `alg` gets that check every time
//! (only accepted tokens are kept). So an address whose tokens were refused after a signature
//! check `limit` times within a minute gets no more checks until that minute is over: its
//! tokens not accepted before are answered 429 at once. Tokens already accepted still pass, so
//! agents behind the same address (a NAT, a load balancer) that hold valid tokens go on.
//!
//! Addresses are counted by network: an IPv4 address alone, an IPv6 address by its /64 (one
//! host usually holds a whole /64). At most [`ADDRESSES_MAX`] are tracked; when full, those
//! whose minute is over are dropped, and if none is, all are.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How long an address's count runs before it starts again.
pub const WINDOW: Duration = Duration::from_secs(60);

/// The most addresses tracked at once (about 40 bytes each).
const ADDRESSES_MAX: usize = 65_536;

/// Refused tokens per client address, for one policy generation.
pub struct RefusedTokens {
    /// Refusals an address may have within [`WINDOW`]; 0: no limit.
    limit: u32,
    by_network: Mutex<HashMap<IpAddr, Window>>,
}

#[derive(Clone, Copy)]
struct Window {
    started: Instant,
    refusals: u32,
}

impl RefusedTokens {
    pub fn new(limit: u32) -> RefusedTokens {
        RefusedTokens {
            limit,
            by_network: Mutex::new(HashMap::new()),
        }
    }

    /// Refusals an address may have within [`WINDOW`]; 0: no limit.
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// `Some(time left)` when `address` has used its budget in the current window.
    pub fn blocked(&self, address: IpAddr, now: Instant) -> Option<Duration> {
        if self.limit == 0 {
            return None;
        }
        let by_network = self.lock();
        let window = by_network.get(&network_of(address))?;
        let left = WINDOW.checked_sub(now.saturating_duration_since(window.started))?;
        (window.refusals >= self.limit && !left.is_zero()).then_some(left)
    }

    /// Counts a refusal of `address`'s token after a signature check; `true` when that was the
    /// one that used up its budget (the moment worth a log line).
    pub fn record(&self, address: IpAddr, now: Instant) -> bool {
        if self.limit == 0 {
            return false;
        }
        let mut by_network = self.lock();
        let network = network_of(address);
        if !by_network.contains_key(&network) && by_network.len() >= ADDRESSES_MAX {
            by_network.retain(|_, window| now.saturating_duration_since(window.started) < WINDOW);
            if by_network.len() >= ADDRESSES_MAX {
                by_network.clear();
            }
        }
        let window = by_network.entry(network).or_insert(Window {
            started: now,
            refusals: 0,
        });
        if now.saturating_duration_since(window.started) >= WINDOW {
            *window = Window {
                started: now,
                refusals: 0,
            };
        }
        window.refusals = window.refusals.saturating_add(1);
        window.refusals == self.limit
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Window>> {
        self.by_network
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// The network an address is counted under: IPv4 (also when mapped into IPv6) alone, IPv6 by
/// its /64.
pub fn network_of(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(Ipv6Addr::from(prefix))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn an_address_is_blocked_once_its_budget_is_used_until_the_minute_ends() {
        let refused = RefusedTokens::new(3);
        let start = Instant::now();
        let attacker = ip("192.0.2.7");
        assert!(!refused.record(attacker, start));
        assert!(!refused.record(attacker, start));
        assert_eq!(refused.blocked(attacker, start), None);
        assert!(
            refused.record(attacker, start),
            "the third refusal uses the budget up"
        );
        let later = start + Duration::from_secs(20);
        assert_eq!(
            refused.blocked(attacker, later),
            Some(Duration::from_secs(40))
        );
        // Others are not affected.
        assert_eq!(refused.blocked(ip("192.0.2.8"), later), None);
        // A new minute, a new budget.
        let next_minute = start + WINDOW;
        assert_eq!(refused.blocked(attacker, next_minute), None);
        assert!(!refused.record(attacker, next_minute));
        assert_eq!(refused.blocked(attacker, next_minute), None);
    }

    #[test]
    fn ipv6_hosts_are_counted_by_their_64_and_mapped_ipv4_as_ipv4() {
        let refused = RefusedTokens::new(2);
        let now = Instant::now();
        refused.record(ip("2001:db8:1:2::1"), now);
        refused.record(ip("2001:db8:1:2:ffff::9"), now);
        assert!(refused.blocked(ip("2001:db8:1:2::77"), now).is_some());
        assert_eq!(refused.blocked(ip("2001:db8:1:3::1"), now), None);
        refused.record(ip("::ffff:198.51.100.1"), now);
        refused.record(ip("198.51.100.1"), now);
        assert!(refused.blocked(ip("198.51.100.1"), now).is_some());
    }

    #[test]
    fn a_zero_limit_blocks_nobody() {
        let refused = RefusedTokens::new(0);
        let now = Instant::now();
        for _ in 0..10 {
            assert!(!refused.record(ip("192.0.2.7"), now));
        }
        assert_eq!(refused.blocked(ip("192.0.2.7"), now), None);
    }

    #[test]
    fn the_table_stays_bounded() {
        let refused = RefusedTokens::new(1);
        let start = Instant::now();
        for n in 0..ADDRESSES_MAX as u32 {
            refused.record(IpAddr::from(n.to_be_bytes()), start);
        }
        assert_eq!(refused.lock().len(), ADDRESSES_MAX);
        // Full and nothing expired: the table starts over rather than grow.
        refused.record(ip("203.0.113.1"), start);
        assert_eq!(refused.lock().len(), 1);
        // Full with expired windows: only those are dropped.
        for n in 1..(ADDRESSES_MAX as u32 - 1) {
            refused.record(IpAddr::from((n << 8).to_be_bytes()), start);
        }
        let fresh = start + WINDOW;
        refused.record(ip("203.0.113.2"), fresh);
        assert_eq!(refused.lock().len(), ADDRESSES_MAX);
        refused.record(ip("203.0.113.3"), fresh + Duration::from_secs(1));
        assert_eq!(refused.lock().len(), 2);
    }
}
