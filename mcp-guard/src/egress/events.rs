//! Reads the kernel's egress events off the ring buffer (asynchronously) and attributes each to
//! the server and agent session that own the cgroup it came from.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aya::maps::{MapData, RingBuf};
use mcp_guard_common::{
    EgressEvent, HOOK_CONNECT4, HOOK_CONNECT6, HOOK_SENDMSG4, HOOK_SENDMSG6, RULE_DEFAULT_DENY,
    VERDICT_ALLOW, VERDICT_WOULD_REFUSE,
};
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

use super::{Directory, SharedDirectory};

/// How long an event may wait in the ring before the reader collects it.
const DRAIN_INTERVAL: Duration = Duration::from_millis(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Allow,
    Refuse,
    /// No rule allows it, but the server is in shadow or learn mode: it went ahead.
    WouldRefuse,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Ipv4,
    Ipv6,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    Other,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Hook {
    Connect4,
    Connect6,
    Sendmsg4,
    Sendmsg6,
    Unknown,
}

macro_rules! display_as_serde_name {
    ($($ty:ty),*) => {$(
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let name = serde_json::to_value(self).ok();
                f.write_str(name.as_ref().and_then(|v| v.as_str()).unwrap_or("?"))
            }
        }
    )*};
}
display_as_serde_name!(Verdict, Family, Protocol, Hook);

/// One connection or datagram attempt by a guarded process, attributed.
#[derive(Clone, Debug, serde::Serialize)]
pub struct EgressAttempt {
    pub at: SystemTime,
    /// CLOCK_MONOTONIC nanoseconds, as the kernel stamped it.
    pub monotonic_ns: u64,
    pub cgroup_id: u64,
    pub guarded_cgroup_id: u64,
    /// `None` when the cgroup is guarded but unknown to this daemon (events buffered before
    /// a restart, from cgroups since removed).
    pub server: Option<Arc<str>>,
    pub session: Option<Arc<str>>,
    pub tgid: u32,
    pub tid: u32,
    pub comm: String,
    pub family: Family,
    pub protocol: Protocol,
    /// IPv4 destinations unmapped, whatever form the process used.
    pub addr: IpAddr,
    pub port: u16,
    pub verdict: Verdict,
    /// `server/egress/<rule id>` of the allowing rule, or `default-deny`.
    pub rule: Arc<str>,
    pub hook: Hook,
    /// The policy `host` this address was resolved from for the server's egress rules.
    pub host: Option<Arc<str>>,
}

/// Turns raw kernel events into attributed attempts.
pub struct EventReader {
    ring: RingBuf<MapData>,
    directory: SharedDirectory,
    clock: MonotonicClock,
}

impl EventReader {
    pub(super) fn new(ring: RingBuf<MapData>, directory: SharedDirectory) -> EventReader {
        EventReader {
            ring,
            directory,
            clock: MonotonicClock::now(),
        }
    }

    /// Reads until the receiver is gone. The kernel submits events without waking us (see the
    /// kernel's `wakeup_flag`), so the ring is drained every `DRAIN_INTERVAL`, and at once
    /// when the kernel wakes us because it is filling up. When the channel is full it waits, and the kernel counts what the ring then cannot hold
    /// (never a silent drop here).
    pub async fn run(self, events: mpsc::Sender<EgressAttempt>) -> std::io::Result<()> {
        let EventReader {
            ring,
            directory,
            clock,
        } = self;
        // SAFETY: the ring buffer owns its map fd and keeps it open, unchanged, while the
        // AsyncFd owns the ring buffer.
        let mut ring =
            unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
                .map_err(|e| e.into_parts().1)?;
        let mut batch = Vec::with_capacity(256);
        let mut tick = tokio::time::interval(DRAIN_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                ready = ring.readable_mut() => {
                    let mut ready = ready?;
                    // Cleared before draining, so an event landing during the drain re-arms it.
                    ready.clear_ready();
                    drain(ready.get_inner_mut(), &mut batch);
                }
                _ = tick.tick() => drain(ring.get_mut(), &mut batch),
            }
            if batch.is_empty() {
                continue;
            }
            let attempts: Vec<EgressAttempt> = {
                let directory = directory.read().expect("directory lock");
                batch
                    .drain(..)
                    .map(|raw| attribute(&raw, &directory, &clock))
                    .collect()
            };
            for attempt in attempts {
                if events.send(attempt).await.is_err() {
                    return Ok(());
                }
            }
        }
    }
}

fn drain(ring: &mut RingBuf<MapData>, batch: &mut Vec<EgressEvent>) {
    while let Some(item) = ring.next() {
        if item.len() >= size_of::<EgressEvent>() {
            // SAFETY: the kernel wrote a whole EgressEvent (a Pod type) at this position; the
            // read is unaligned-safe.
            batch.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<EgressEvent>()) });
        }
    }
}

/// Attributes one raw event using the owners and rule names known now.
pub fn attribute(
    raw: &EgressEvent,
    directory: &Directory,
    clock: &MonotonicClock,
) -> EgressAttempt {
    let owner = directory.owners.get(&raw.guarded_cgroup_id);
    let addr = unmapped(raw.addr);
    // The host rule that matched names the host (a refusal's RULE_DEFAULT_DENY is no rule's
    // id); else any host rule of the server that resolved to this address.
    let host = directory
        .rule_hosts
        .get(&raw.rule_id)
        .or_else(|| {
            owner
                .and_then(|o| directory.hosts.get(&o.server))
                .and_then(|hosts| hosts.get(&addr))
        })
        .cloned();
    let rule = if raw.verdict == VERDICT_ALLOW || raw.rule_id != RULE_DEFAULT_DENY {
        directory
            .rules
            .get(&raw.rule_id)
            .cloned()
            .unwrap_or_else(|| Arc::from(format!("rule#{}", raw.rule_id)))
    } else {
        Arc::from("default-deny")
    };
    EgressAttempt {
        at: clock.wall_time(raw.ts_ns),
        monotonic_ns: raw.ts_ns,
        cgroup_id: raw.cgroup_id,
        guarded_cgroup_id: raw.guarded_cgroup_id,
        server: owner.map(|o| o.server.clone()),
        session: owner.and_then(|o| o.session.clone()),
        tgid: raw.tgid,
        tid: raw.tid,
        comm: comm_text(&raw.comm),
        family: if raw.family == libc::AF_INET as u8 {
            Family::Ipv4
        } else {
            Family::Ipv6
        },
        protocol: match raw.protocol as i32 {
            libc::IPPROTO_TCP => Protocol::Tcp,
            libc::IPPROTO_UDP => Protocol::Udp,
            _ => Protocol::Other,
        },
        addr,
        port: raw.port,
        verdict: match raw.verdict {
            VERDICT_ALLOW => Verdict::Allow,
            VERDICT_WOULD_REFUSE => Verdict::WouldRefuse,
            // Anything else is a refusal: what the kernel did not allow it refused.
            _ => Verdict::Refuse,
        },
        rule,
        hook: match raw.hook {
            HOOK_CONNECT4 => Hook::Connect4,
            HOOK_CONNECT6 => Hook::Connect6,
            HOOK_SENDMSG4 => Hook::Sendmsg4,
            HOOK_SENDMSG6 => Hook::Sendmsg6,
            _ => Hook::Unknown,
        },
        host,
    }
}

fn unmapped(octets: [u8; 16]) -> IpAddr {
    Ipv6Addr::from(octets).to_canonical()
}

fn comm_text(comm: &[u8; 16]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

/// Converts kernel monotonic timestamps to wall-clock time.
#[derive(Clone, Copy, Debug)]
pub struct MonotonicClock {
    wall_at_zero: SystemTime,
}

impl MonotonicClock {
    pub fn now() -> MonotonicClock {
        let monotonic = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .map(Duration::from)
            .unwrap_or_default();
        MonotonicClock {
            wall_at_zero: SystemTime::now() - monotonic,
        }
    }

    pub fn wall_time(&self, monotonic_ns: u64) -> SystemTime {
        self.wall_at_zero + Duration::from_nanos(monotonic_ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::egress::CgroupOwner;
    use mcp_guard_common::VERDICT_REFUSE;
    use std::collections::HashMap;

    fn raw(addr: [u8; 16], verdict: u8, rule_id: u32) -> EgressEvent {
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"node");
        EgressEvent {
            ts_ns: 1_000,
            cgroup_id: 42,
            guarded_cgroup_id: 42,
            tgid: 7,
            tid: 8,
            policy_id: 1,
            rule_id,
            addr,
            port: 443,
            family: libc::AF_INET6 as u8,
            protocol: libc::IPPROTO_TCP as u8,
            verdict,
            hook: HOOK_CONNECT6,
            _pad: [0; 2],
            comm,
        }
    }

    fn directory() -> Directory {
        let mut directory = Directory::default();
        directory.owners.insert(
            42,
            CgroupOwner {
                server: Arc::from("web"),
                session: Some(Arc::from("abc")),
                path: "/x".into(),
            },
        );
        directory.rules.insert(5, Arc::from("web/egress/api"));
        directory.hosts.insert(
            Arc::from("web"),
            HashMap::from([("10.0.0.1".parse().unwrap(), Arc::from("api.example.com"))]),
        );
        directory
    }

    #[test]
    fn attributes_owner_rule_and_unmaps_ipv4() {
        let mapped = "::ffff:10.0.0.1".parse::<Ipv6Addr>().unwrap().octets();
        let attempt = attribute(
            &raw(mapped, VERDICT_ALLOW, 5),
            &directory(),
            &MonotonicClock::now(),
        );
        assert_eq!(attempt.server.as_deref(), Some("web"));
        assert_eq!(attempt.session.as_deref(), Some("abc"));
        assert_eq!(&*attempt.rule, "web/egress/api");
        assert_eq!(attempt.addr, "10.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(attempt.comm, "node");
        assert_eq!(attempt.protocol, Protocol::Tcp);
        assert_eq!(attempt.hook, Hook::Connect6);
        assert_eq!(attempt.host.as_deref(), Some("api.example.com"));
    }

    #[test]
    fn the_host_rule_that_allowed_a_connection_names_its_host() {
        // Two host rules resolve to 10.0.0.1 (a shared front end, say); the address map keeps
        // the first, but rule 6, which allowed this connection, is for the other host.
        let mut directory = directory();
        directory.rules.insert(6, Arc::from("web/egress/billing"));
        directory.rule_hosts.insert(5, Arc::from("api.example.com"));
        directory
            .rule_hosts
            .insert(6, Arc::from("billing.example.com"));
        let addr = "::ffff:10.0.0.1".parse::<Ipv6Addr>().unwrap().octets();
        let allowed = attribute(
            &raw(addr, VERDICT_ALLOW, 6),
            &directory,
            &MonotonicClock::now(),
        );
        assert_eq!(allowed.host.as_deref(), Some("billing.example.com"));
        // A refused connection (no rule matched its port) falls back to the address's host.
        let refused = attribute(
            &raw(addr, VERDICT_REFUSE, 0),
            &directory,
            &MonotonicClock::now(),
        );
        assert_eq!(refused.host.as_deref(), Some("api.example.com"));
    }

    #[test]
    fn a_rule_of_a_replaced_generation_names_its_events_until_forgotten() {
        let mut directory = directory();
        // A reload: the new generation's rules get new ids; rule 5's events may still be read.
        directory.add_rules(
            HashMap::from([(9, Arc::from("web/egress/api-v2"))]),
            HashMap::from([(9, Arc::from("api.example.com"))]),
        );
        let addr = "::ffff:10.0.0.1".parse::<Ipv6Addr>().unwrap().octets();
        let read_late = attribute(
            &raw(addr, VERDICT_ALLOW, 5),
            &directory,
            &MonotonicClock::now(),
        );
        assert_eq!(&*read_late.rule, "web/egress/api");
        directory.forget_rules(&[5]);
        let read_after = attribute(
            &raw(addr, VERDICT_ALLOW, 5),
            &directory,
            &MonotonicClock::now(),
        );
        assert_eq!(&*read_after.rule, "rule#5");
        let current = attribute(
            &raw(addr, VERDICT_ALLOW, 9),
            &directory,
            &MonotonicClock::now(),
        );
        assert_eq!(&*current.rule, "web/egress/api-v2");
    }

    #[test]
    fn record_only_refusals_are_would_refuse_by_the_default_deny() {
        let attempt = attribute(
            &raw(Ipv6Addr::LOCALHOST.octets(), VERDICT_WOULD_REFUSE, 0),
            &directory(),
            &MonotonicClock::now(),
        );
        assert_eq!(attempt.verdict, Verdict::WouldRefuse);
        assert_eq!(attempt.verdict.to_string(), "would_refuse");
        assert_eq!(&*attempt.rule, "default-deny");
        assert_eq!(attempt.host, None, "not an address resolved for web");
    }

    #[test]
    fn refusal_without_rule_is_default_deny_and_unknown_cgroup_has_no_owner() {
        let mut event = raw(Ipv6Addr::LOCALHOST.octets(), VERDICT_REFUSE, 0);
        event.guarded_cgroup_id = 99;
        let attempt = attribute(&event, &directory(), &MonotonicClock::now());
        assert_eq!(&*attempt.rule, "default-deny");
        assert_eq!(attempt.verdict, Verdict::Refuse);
        assert!(attempt.server.is_none());
        assert_eq!(attempt.verdict.to_string(), "refuse");
    }
}
