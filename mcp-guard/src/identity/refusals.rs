//! Budgets of refused bearer tokens: per client address, and over all addresses.
//!
//! Checking an RS256 or ES256 signature costs a fifth of a millisecond of CPU, and a token a
//! sender forges with a trusted issuer's `iss`, `kid` and `alg` gets that check every time
//! (only accepted tokens are kept). So an address whose tokens were refused after a signature
//! check `per_address` times within a minute gets no more checks until that minute is over: its
//! tokens not accepted before are answered 429 at once. Tokens already accepted still pass, so
//! agents behind the same address (a NAT, a load balancer) that hold valid tokens go on.
//!
//! A sender with many addresses (a botnet, an IPv6 /48) could still buy `per_address` checks
//! with each. So refusals are also counted over all addresses, and once `all_addresses` were
//! refused within a minute, no token not accepted before is checked until that minute is over,
//! from any address: the daemon's CPU stays bounded, at the price of new tokens (an agent's
//! first, or a refreshed one) waiting out the minute while an attack lasts.
//!
//! Addresses are counted by network: an IPv4 address alone, an IPv6 address by its /64 (one
//! host usually holds a whole /64). At most [`ADDRESSES_MAX`] are tracked; when full, those
//! whose minute is over are dropped, and if none is, all are.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How long a count runs before it starts again.
pub const WINDOW: Duration = Duration::from_secs(60);

/// The most addresses tracked at once (about 40 bytes each).
const ADDRESSES_MAX: usize = 65_536;

/// Which budget of refusals a token was held back by, or a refusal used up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    /// The client address's (`refused_tokens_per_minute`).
    Address,
    /// All addresses' together (`refused_tokens_per_minute_all_addresses`).
    AllAddresses,
}

/// Refused tokens per client address and in all, for one policy generation.
pub struct RefusedTokens {
    /// Refusals an address may have within [`WINDOW`]; 0: no limit.
    per_address: u32,
    /// Refusals all addresses together may have within [`WINDOW`]; 0: no limit.
    all_addresses: u32,
    counts: Mutex<Counts>,
}

struct Counts {
    by_network: HashMap<IpAddr, Window>,
    /// From the first refusal on.
    all: Option<Window>,
}

#[derive(Clone, Copy)]
struct Window {
    started: Instant,
    refusals: u32,
}

impl Window {
    fn starting(now: Instant) -> Window {
        Window {
            started: now,
            refusals: 0,
        }
    }

    fn is_over(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.started) >= WINDOW
    }

    /// The time left of this window, if its refusals reached `limit`.
    fn used_up(&self, limit: u32, now: Instant) -> Option<Duration> {
        let left = WINDOW.checked_sub(now.saturating_duration_since(self.started))?;
        (limit > 0 && self.refusals >= limit && !left.is_zero()).then_some(left)
    }

    /// Counts a refusal (in a new window if this one is over); `true` when it was the one
    /// that reached `limit`.
    fn count(&mut self, limit: u32, now: Instant) -> bool {
        if self.is_over(now) {
            *self = Window::starting(now);
        }
        self.refusals = self.refusals.saturating_add(1);
        self.refusals == limit
    }
}

impl RefusedTokens {
    pub fn new(per_address: u32, all_addresses: u32) -> RefusedTokens {
        RefusedTokens {
            per_address,
            all_addresses,
            counts: Mutex::new(Counts {
                by_network: HashMap::new(),
                all: None,
            }),
        }
    }

    /// Refusals `budget` allows within [`WINDOW`]; 0: no limit.
    pub fn limit(&self, budget: Budget) -> u32 {
        match budget {
            Budget::Address => self.per_address,
            Budget::AllAddresses => self.all_addresses,
        }
    }

    /// The budget `address` has used up in the current window, and the time left of it; the
    /// address's own first.
    pub fn blocked(&self, address: IpAddr, now: Instant) -> Option<(Budget, Duration)> {
        if self.per_address == 0 && self.all_addresses == 0 {
            return None;
        }
        let counts = self.lock();
        let own = counts
            .by_network
            .get(&network_of(address))
            .and_then(|window| window.used_up(self.per_address, now));
        own.map(|left| (Budget::Address, left)).or_else(|| {
            let left = counts.all?.used_up(self.all_addresses, now)?;
            Some((Budget::AllAddresses, left))
        })
    }

    /// Counts a refusal of `address`'s token after a signature check; the budget it used up,
    /// if it was the one that did (the moment worth a log line).
    pub fn record(&self, address: IpAddr, now: Instant) -> Option<Budget> {
        let mut counts = self.lock();
        let mut used_up = None;
        if self.per_address > 0
            && count_address(&mut counts.by_network, address, self.per_address, now)
        {
            used_up = Some(Budget::Address);
        }
        if self.all_addresses > 0
            && counts
                .all
                .get_or_insert(Window::starting(now))
                .count(self.all_addresses, now)
        {
            used_up = Some(Budget::AllAddresses);
        }
        used_up
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Counts a refusal of `address`'s network, keeping the table within [`ADDRESSES_MAX`];
/// `true` when it reached `limit`.
fn count_address(
    by_network: &mut HashMap<IpAddr, Window>,
    address: IpAddr,
    limit: u32,
    now: Instant,
) -> bool {
    let network = network_of(address);
    if !by_network.contains_key(&network) && by_network.len() >= ADDRESSES_MAX {
        by_network.retain(|_, window| !window.is_over(now));
        if by_network.len() >= ADDRESSES_MAX {
            by_network.clear();
        }
    }
    by_network
        .entry(network)
        .or_insert(Window::starting(now))
        .count(limit, now)
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
        let refused = RefusedTokens::new(3, 0);
        let start = Instant::now();
        let attacker = ip("192.0.2.7");
        assert_eq!(refused.record(attacker, start), None);
        assert_eq!(refused.record(attacker, start), None);
        assert_eq!(refused.blocked(attacker, start), None);
        assert_eq!(
            refused.record(attacker, start),
            Some(Budget::Address),
            "the third refusal uses the budget up"
        );
        let later = start + Duration::from_secs(20);
        assert_eq!(
            refused.blocked(attacker, later),
            Some((Budget::Address, Duration::from_secs(40)))
        );
        // Others are not affected.
        assert_eq!(refused.blocked(ip("192.0.2.8"), later), None);
        // A new minute, a new budget.
        let next_minute = start + WINDOW;
        assert_eq!(refused.blocked(attacker, next_minute), None);
        assert_eq!(refused.record(attacker, next_minute), None);
        assert_eq!(refused.blocked(attacker, next_minute), None);
    }

    #[test]
    fn refusals_from_many_addresses_use_up_the_budget_of_all_of_them_until_the_minute_ends() {
        let refused = RefusedTokens::new(3, 5);
        let start = Instant::now();
        let sender = |n: u8| IpAddr::from([198, 51, 100, n]);
        for n in 1..5 {
            assert_eq!(refused.record(sender(n), start), None);
        }
        assert_eq!(refused.blocked(sender(9), start), None);
        assert_eq!(
            refused.record(sender(5), start),
            Some(Budget::AllAddresses),
            "the fifth refusal, from the fifth address, uses up the budget of all"
        );
        let later = start + Duration::from_secs(45);
        for address in [sender(1), sender(9), ip("2001:db8::1")] {
            assert_eq!(
                refused.blocked(address, later),
                Some((Budget::AllAddresses, Duration::from_secs(15))),
                "{address}"
            );
        }
        // A new minute, a new budget for all.
        let next_minute = start + WINDOW;
        assert_eq!(refused.blocked(sender(9), next_minute), None);
        assert_eq!(refused.record(sender(9), next_minute), None);
        assert_eq!(refused.blocked(sender(9), next_minute), None);
    }

    #[test]
    fn an_address_over_its_own_budget_is_told_so_before_the_budget_of_all() {
        let refused = RefusedTokens::new(2, 2);
        let now = Instant::now();
        let attacker = ip("192.0.2.7");
        assert_eq!(refused.record(attacker, now), None);
        // Both budgets run out with this one: the wider one is what the log must say.
        assert_eq!(refused.record(attacker, now), Some(Budget::AllAddresses));
        assert!(matches!(
            refused.blocked(attacker, now),
            Some((Budget::Address, _))
        ));
        assert!(matches!(
            refused.blocked(ip("192.0.2.8"), now),
            Some((Budget::AllAddresses, _))
        ));
    }

    #[test]
    fn ipv6_hosts_are_counted_by_their_64_and_mapped_ipv4_as_ipv4() {
        let refused = RefusedTokens::new(2, 0);
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
        let refused = RefusedTokens::new(0, 0);
        let now = Instant::now();
        for _ in 0..10 {
            assert_eq!(refused.record(ip("192.0.2.7"), now), None);
        }
        assert_eq!(refused.blocked(ip("192.0.2.7"), now), None);
    }

    #[test]
    fn the_table_stays_bounded() {
        let refused = RefusedTokens::new(1, 0);
        let start = Instant::now();
        for n in 0..ADDRESSES_MAX as u32 {
            refused.record(IpAddr::from(n.to_be_bytes()), start);
        }
        assert_eq!(refused.lock().by_network.len(), ADDRESSES_MAX);
        // Full and nothing expired: the table starts over rather than grow.
        refused.record(ip("203.0.113.1"), start);
        assert_eq!(refused.lock().by_network.len(), 1);
        // Full with expired windows: only those are dropped.
        for n in 1..(ADDRESSES_MAX as u32 - 1) {
            refused.record(IpAddr::from((n << 8).to_be_bytes()), start);
        }
        let fresh = start + WINDOW;
        refused.record(ip("203.0.113.2"), fresh);
        assert_eq!(refused.lock().by_network.len(), ADDRESSES_MAX);
        refused.record(ip("203.0.113.3"), fresh + Duration::from_secs(1));
        assert_eq!(refused.lock().by_network.len(), 2);
    }
}
