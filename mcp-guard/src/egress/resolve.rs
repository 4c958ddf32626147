//! Host names in egress rules, resolved in userspace and re-resolved when their TTL expires.
//!
//! The kernel only sees addresses. Clients often cache DNS answers past their TTL, and
//! round-robin names rotate (cilium#20650), so an address that drops out of an answer stays
//! allowed for one more `max_ttl` before it is removed.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use hickory_resolver::TokioResolver;

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("reading the system resolver configuration (/etc/resolv.conf): {0}")]
    Config(String),
}

#[derive(Debug, Clone)]
struct HostAddresses {
    /// Each address with the instant after which it is no longer allowed.
    addresses: BTreeMap<IpAddr, Instant>,
    refresh_at: Instant,
    last_error: Option<String>,
}

/// Outcome of resolving one name, for logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    Resolved { addresses: usize, ttl: Duration },
    Failed(String),
}

pub struct HostResolver {
    resolver: TokioResolver,
    min_ttl: Duration,
    max_ttl: Duration,
    hosts: BTreeMap<String, HostAddresses>,
}

impl HostResolver {
    pub fn from_system(min_ttl: Duration, max_ttl: Duration) -> Result<HostResolver, ResolveError> {
        let mut builder =
            TokioResolver::builder_tokio().map_err(|e| ResolveError::Config(e.to_string()))?;
        // Our own refresh schedule is the cache; the library's would hide TTL changes.
        builder.options_mut().cache_size = 0;
        Ok(HostResolver {
            resolver: builder.build(),
            min_ttl,
            max_ttl,
            hosts: BTreeMap::new(),
        })
    }

    /// Makes the set of tracked names equal to `names`, resolving new ones now.
    pub async fn track(&mut self, names: &BTreeSet<String>) -> Vec<(String, Resolution)> {
        self.hosts.retain(|name, _| names.contains(name));
        let mut outcomes = Vec::new();
        for name in names {
            if !self.hosts.contains_key(name) {
                outcomes.push((name.clone(), self.resolve(name).await));
            }
        }
        outcomes
    }

    /// Re-resolves the names whose refresh time has come. Returns what happened and whether
    /// any name's allowed address set changed.
    pub async fn refresh_due(&mut self) -> (Vec<(String, Resolution)>, bool) {
        let now = Instant::now();
        let due: Vec<String> = self
            .hosts
            .iter()
            .filter(|(_, h)| h.refresh_at <= now)
            .map(|(n, _)| n.clone())
            .collect();
        let before = self.snapshot();
        let mut outcomes = Vec::new();
        for name in due {
            outcomes.push((name.clone(), self.resolve(&name).await));
        }
        self.expire(Instant::now());
        let changed = before != self.snapshot();
        (outcomes, changed)
    }

    /// When the next name is due for re-resolution.
    pub fn next_refresh(&self) -> Option<Instant> {
        self.hosts.values().map(|h| h.refresh_at).min()
    }

    /// The addresses a rule naming `host` currently allows (none if it never resolved: the rule
    /// then allows nothing, which fails closed).
    pub fn addresses(&self, host: &str) -> Vec<IpAddr> {
        self.hosts
            .get(host)
            .map(|h| h.addresses.keys().copied().collect())
            .unwrap_or_default()
    }

    fn snapshot(&self) -> BTreeMap<String, Vec<IpAddr>> {
        self.hosts
            .keys()
            .map(|n| (n.clone(), self.addresses(n)))
            .collect()
    }

    async fn resolve(&mut self, name: &str) -> Resolution {
        let now = Instant::now();
        let lookup = self.resolver.lookup_ip(name).await;
        let entry = self
            .hosts
            .entry(name.to_owned())
            .or_insert_with(|| HostAddresses {
                addresses: BTreeMap::new(),
                refresh_at: now,
                last_error: None,
            });
        match lookup {
            Ok(answer) => {
                let ttl = clamp(
                    answer.valid_until().saturating_duration_since(now),
                    self.min_ttl,
                    self.max_ttl,
                );
                let valid_until = now + ttl + self.max_ttl;
                let addresses: Vec<IpAddr> = answer.iter().collect();
                for addr in &addresses {
                    entry.addresses.insert(*addr, valid_until);
                }
                entry.refresh_at = now + ttl;
                entry.last_error = None;
                Resolution::Resolved {
                    addresses: addresses.len(),
                    ttl,
                }
            }
            Err(e) => {
                // Keep what we had (it expires on its own schedule) and retry soon.
                entry.refresh_at = now + self.min_ttl;
                let message = e.to_string();
                entry.last_error = Some(message.clone());
                Resolution::Failed(message)
            }
        }
    }

    fn expire(&mut self, now: Instant) {
        for host in self.hosts.values_mut() {
            host.addresses.retain(|_, until| *until > now);
        }
    }
}

fn clamp(ttl: Duration, min: Duration, max: Duration) -> Duration {
    ttl.max(min).min(max.max(min))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_is_clamped_to_configured_bounds() {
        let (min, max) = (Duration::from_secs(5), Duration::from_secs(300));
        assert_eq!(clamp(Duration::from_secs(1), min, max), min);
        assert_eq!(clamp(Duration::from_secs(9000), min, max), max);
        assert_eq!(
            clamp(Duration::from_secs(60), min, max),
            Duration::from_secs(60)
        );
    }

    #[tokio::test]
    async fn localhost_resolves_from_the_hosts_file() {
        let mut resolver =
            HostResolver::from_system(Duration::from_secs(5), Duration::from_secs(300)).unwrap();
        let names = BTreeSet::from(["localhost".to_owned()]);
        let outcomes = resolver.track(&names).await;
        assert!(
            matches!(outcomes[0].1, Resolution::Resolved { .. }),
            "{outcomes:?}"
        );
        assert!(
            resolver
                .addresses("localhost")
                .contains(&IpAddr::from([127, 0, 0, 1]))
        );
        assert!(resolver.next_refresh().is_some());
    }
}
