//! Types shared by the kernel programs (`mcp-guard-ebpf`) and the daemon (`mcp-guard`).
//!
//! Everything here is `#[repr(C)]` and laid out without implicit padding, because the kernel and
//! userspace read the same bytes. The `user` feature adds `aya::Pod` so the daemon can put these
//! types into maps.
#![no_std]

/// Names of the maps and programs, shared so userspace never spells them differently.
pub mod names {
    pub const GUARDED_CGROUPS: &str = "GUARDED_CGROUPS";
    pub const ALLOW_LIST: &str = "ALLOW_LIST";
    pub const EVENTS: &str = "EVENTS";
    pub const LOST_EVENTS: &str = "LOST_EVENTS";
    pub const PROGRAMS: [&str; 4] = ["connect4", "connect6", "sendmsg4", "sendmsg6"];
}

/// How many guarded cgroups (server × session) one host can hold.
pub const MAX_GUARDED_CGROUPS: u32 = 65_536;
/// Total allow-list prefixes over all servers and policy generations.
pub const MAX_ALLOW_PREFIXES: u32 = 262_144;
/// Port/protocol rules that can apply to one address prefix (rules of covering prefixes
/// included, see `AllowValue`).
pub const MAX_PORT_RULES: usize = 16;
/// Ring buffer size in bytes (a power-of-two multiple of the page size).
pub const EVENTS_BYTES: u32 = 4 * 1024 * 1024;
/// How deep the kernel looks for a guarded ancestor of the current cgroup.
pub const MAX_CGROUP_DEPTH: i32 = 16;

/// Protocol bits in `PortRule::protocols`.
pub const PROTO_TCP: u8 = 1;
pub const PROTO_UDP: u8 = 2;

/// `EgressEvent::verdict`.
pub const VERDICT_REFUSE: u8 = 0;
pub const VERDICT_ALLOW: u8 = 1;
/// No rule allows the attempt, but its cgroup is record-only ([`GUARD_FLAG_RECORD_ONLY`]), so
/// it went ahead.
pub const VERDICT_WOULD_REFUSE: u8 = 2;

/// `GuardEntry::flags`: report what no rule allows as [`VERDICT_WOULD_REFUSE`] and let it
/// through (a server in shadow or learn mode).
pub const GUARD_FLAG_RECORD_ONLY: u32 = 1;

/// `EgressEvent::hook`: which program judged the attempt.
pub const HOOK_CONNECT4: u8 = 1;
pub const HOOK_CONNECT6: u8 = 2;
pub const HOOK_SENDMSG4: u8 = 3;
pub const HOOK_SENDMSG6: u8 = 4;

/// `rule_id` of a refusal that no rule matched: the default for a guarded cgroup.
pub const RULE_DEFAULT_DENY: u32 = 0;

/// Value of `GUARDED_CGROUPS[cgroup id]`: which compiled allow-list judges that cgroup.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuardEntry {
    pub policy_id: u32,
    /// `GUARD_FLAG_*` bits.
    pub flags: u32,
}

/// Data part of the LPM-trie key. Both address families live in one trie: IPv4 addresses are
/// stored IPv4-mapped (`::ffff:a.b.c.d`), so an IPv4 connect and an IPv4-mapped IPv6 connect
/// reach the same entries and the mapped form cannot bypass an IPv4 rule.
///
/// The prefix length covers `policy_id` (always all 32 bits) then the address bits.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AllowKey {
    /// Big-endian, so the trie's bitwise prefix matching sees the id's bits first.
    pub policy_id_be: u32,
    pub addr: [u8; 16],
}

/// One port range with its protocols, and the policy rule that declared it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PortRule {
    pub port_lo: u16,
    pub port_hi: u16,
    /// `PROTO_TCP | PROTO_UDP` bits.
    pub protocols: u8,
    pub _pad: [u8; 3],
    /// Userspace's id for the policy rule; reported in events.
    pub rule_id: u32,
}

/// Value of an allow-list prefix. The trie returns only the longest matching prefix, so
/// userspace copies the rules of every shorter, covering prefix of the same policy into it;
/// the kernel then needs a single lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AllowValue {
    pub count: u32,
    pub _pad: u32,
    pub rules: [PortRule; MAX_PORT_RULES],
}

/// One connection or datagram attempt from a guarded cgroup, as the kernel saw it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EgressEvent {
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    pub cgroup_id: u64,
    /// The guarded cgroup (the event's cgroup or its guarded ancestor).
    pub guarded_cgroup_id: u64,
    pub tgid: u32,
    pub tid: u32,
    pub policy_id: u32,
    pub rule_id: u32,
    /// IPv4 destinations appear IPv4-mapped (`::ffff:a.b.c.d`).
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    /// `AF_INET` or `AF_INET6`: the family of the socket call.
    pub family: u8,
    /// `IPPROTO_TCP`, `IPPROTO_UDP`, or what the socket said.
    pub protocol: u8,
    pub verdict: u8,
    pub hook: u8,
    pub _pad: [u8; 2],
    pub comm: [u8; 16],
}

impl AllowValue {
    pub const EMPTY: AllowValue = AllowValue {
        count: 0,
        _pad: 0,
        rules: [PortRule {
            port_lo: 0,
            port_hi: 0,
            protocols: 0,
            _pad: [0; 3],
            rule_id: 0,
        }; MAX_PORT_RULES],
    };
}

/// Bit length of the `policy_id` part of an `AllowKey` prefix.
pub const POLICY_ID_BITS: u32 = 32;
/// Bits of an IPv4 prefix's `AllowKey` that come before the IPv4 address (the mapped prefix).
pub const V4_MAPPED_PREFIX_BITS: u32 = 96;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all are repr(C), Copy, without padding bytes the kernel could leave uninitialised
    // (explicit `_pad` fields fill every gap), and every bit pattern is valid.
    unsafe impl aya::Pod for super::GuardEntry {}
    unsafe impl aya::Pod for super::AllowKey {}
    unsafe impl aya::Pod for super::PortRule {}
    unsafe impl aya::Pod for super::AllowValue {}
    unsafe impl aya::Pod for super::EgressEvent {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_hidden_padding() {
        assert_eq!(size_of::<GuardEntry>(), 8);
        assert_eq!(size_of::<AllowKey>(), 20);
        assert_eq!(size_of::<PortRule>(), 12);
        assert_eq!(size_of::<AllowValue>(), 8 + 12 * MAX_PORT_RULES);
        assert_eq!(size_of::<EgressEvent>(), 8 * 3 + 4 * 4 + 16 + 2 + 6 + 16);
    }
}
