//! Kernel half of mcp-guard: cgroup sock_addr programs that confine guarded cgroups (MCP server
//! processes) to their declared destinations and report every attempt on a ring buffer.
//!
//! Attached at the root of mcp-guard's cgroup subtree (and at adopted cgroups). A cgroup that is
//! neither guarded itself nor below a guarded cgroup passes untouched; a guarded one may reach
//! only the prefixes, ports and protocols of its allow-list, everything else gets EPERM, unless
//! the cgroup is record-only (shadow and learn modes): then it is reported and let through.
#![no_std]
#![no_main]

use aya_ebpf::{
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_comm,
        bpf_get_current_pid_tgid, bpf_ktime_get_ns,
    },
    macros::{cgroup_sock_addr, map},
    maps::{HashMap, LpmTrie, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::SockAddrContext,
};
use mcp_guard_common::{
    AllowKey, AllowValue, EVENTS_BYTES, EgressEvent, GUARD_FLAG_RECORD_ONLY, GuardEntry,
    HOOK_CONNECT4, HOOK_CONNECT6, HOOK_SENDMSG4, HOOK_SENDMSG6, MAX_ALLOW_PREFIXES,
    MAX_CGROUP_DEPTH, MAX_GUARDED_CGROUPS, MAX_PORT_RULES, POLICY_ID_BITS, PROTO_TCP, PROTO_UDP,
    RULE_DEFAULT_DENY, VERDICT_ALLOW, VERDICT_REFUSE, VERDICT_WOULD_REFUSE,
};

const ALLOW: i32 = 1;
const REFUSE: i32 = 0;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;
const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;
const BPF_RB_AVAIL_DATA: u64 = 0;
/// LPM tries must be created without preallocation.
const BPF_F_NO_PREALLOC: u32 = 1;

#[map]
static GUARDED_CGROUPS: HashMap<u64, GuardEntry> = HashMap::pinned(MAX_GUARDED_CGROUPS, 0);

#[map]
static ALLOW_LIST: LpmTrie<AllowKey, AllowValue> =
    LpmTrie::pinned(MAX_ALLOW_PREFIXES, BPF_F_NO_PREALLOC);

#[map]
static EVENTS: RingBuf = RingBuf::pinned(EVENTS_BYTES, 0);

#[map]
static LOST_EVENTS: PerCpuArray<u64> = PerCpuArray::pinned(1, 0);

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    judge::<HOOK_CONNECT4>(&ctx)
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    judge::<HOOK_CONNECT6>(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    judge::<HOOK_SENDMSG4>(&ctx)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    judge::<HOOK_SENDMSG6>(&ctx)
}

/// Where the socket call is going, normalised: IPv4 as IPv4-mapped IPv6.
struct Destination {
    addr: [u8; 16],
    port: u16,
    family: u8,
    protocol: u8,
}

/// Generic over the hook so each program is compiled on its own: the verifier refuses context
/// reads through a pointer shared between the IPv4 and IPv6 paths.
fn judge<const HOOK: u8>(ctx: &SockAddrContext) -> i32 {
    let Some((guarded_cgroup_id, guard)) = find_guard() else {
        return ALLOW;
    };
    let dest = destination::<HOOK>(ctx);
    let rule_id = matching_rule(guard.policy_id, &dest);
    let verdict = if rule_id.is_some() {
        VERDICT_ALLOW
    } else if guard.flags & GUARD_FLAG_RECORD_ONLY != 0 {
        VERDICT_WOULD_REFUSE
    } else {
        VERDICT_REFUSE
    };
    report(
        guarded_cgroup_id,
        guard.policy_id,
        rule_id.unwrap_or(RULE_DEFAULT_DENY),
        &dest,
        verdict,
        HOOK,
    );
    // The verifier insists the return value is provably 0 or 1; LLVM folds the comparison
    // into a register whose range the verifier cannot bound, so mask behind an opaque value.
    (core::hint::black_box(if verdict == VERDICT_REFUSE {
        REFUSE
    } else {
        ALLOW
    }) & 1) as i32
}

/// The current cgroup if it is guarded, else its deepest guarded ancestor: a server that makes
/// a sub-cgroup for itself stays confined.
fn find_guard() -> Option<(u64, GuardEntry)> {
    let own = unsafe { bpf_get_current_cgroup_id() };
    if let Some(entry) = unsafe { GUARDED_CGROUPS.get(own) } {
        return Some((own, *entry));
    }
    let mut found = None;
    for level in 0..MAX_CGROUP_DEPTH {
        let ancestor = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if ancestor == 0 {
            break;
        }
        if let Some(entry) = unsafe { GUARDED_CGROUPS.get(ancestor) } {
            found = Some((ancestor, *entry));
        }
    }
    found
}

fn destination<const HOOK: u8>(ctx: &SockAddrContext) -> Destination {
    let sa = unsafe { &*ctx.sock_addr };
    let mut addr = [0u8; 16];
    let family = if HOOK == HOOK_CONNECT4 || HOOK == HOOK_SENDMSG4 {
        addr[10] = 0xff;
        addr[11] = 0xff;
        addr[12..16].copy_from_slice(&sa.user_ip4.to_ne_bytes());
        AF_INET
    } else {
        // One 4-byte load per word: the verifier refuses wider or narrower context reads.
        let words = [
            sa.user_ip6[0],
            sa.user_ip6[1],
            sa.user_ip6[2],
            sa.user_ip6[3],
        ];
        for (i, word) in words.iter().enumerate() {
            addr[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
        }
        AF_INET6
    };
    let protocol = if HOOK == HOOK_SENDMSG4 || HOOK == HOOK_SENDMSG6 {
        IPPROTO_UDP as u8
    } else {
        sa.protocol as u8
    };
    Destination {
        addr,
        port: u16::from_be(sa.user_port as u16),
        family,
        protocol,
    }
}

/// The id of the first rule of the longest matching prefix that admits this port and protocol.
fn matching_rule(policy_id: u32, dest: &Destination) -> Option<u32> {
    let protocol_bit = match dest.protocol as u32 {
        IPPROTO_TCP => PROTO_TCP,
        IPPROTO_UDP => PROTO_UDP,
        _ => return None,
    };
    let key = Key::new(
        POLICY_ID_BITS + 128,
        AllowKey {
            policy_id_be: policy_id.to_be(),
            addr: dest.addr,
        },
    );
    let value: &AllowValue = ALLOW_LIST.get(&key)?;
    let count = (value.count as usize).min(MAX_PORT_RULES);
    for i in 0..MAX_PORT_RULES {
        if i >= count {
            break;
        }
        let rule = &value.rules[i];
        if rule.protocols & protocol_bit != 0
            && rule.port_lo <= dest.port
            && dest.port <= rule.port_hi
        {
            return Some(rule.rule_id);
        }
    }
    None
}

fn report(
    guarded_cgroup_id: u64,
    policy_id: u32,
    rule_id: u32,
    dest: &Destination,
    verdict: u8,
    hook: u8,
) {
    let Some(mut slot) = EVENTS.reserve::<EgressEvent>(0) else {
        count_lost_event();
        return;
    };
    let pid_tgid = bpf_get_current_pid_tgid();
    slot.write(EgressEvent {
        ts_ns: unsafe { bpf_ktime_get_ns() },
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        guarded_cgroup_id,
        tgid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        policy_id,
        rule_id,
        addr: dest.addr,
        port: dest.port,
        family: dest.family,
        protocol: dest.protocol,
        verdict,
        hook,
        _pad: [0; 2],
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    });
    slot.submit(wakeup_flag());
}

/// Waking the reader for every event costs the connecting process several microseconds, so
/// events are submitted silently and the reader drains on a short timer; it is woken early
/// only when the ring is a quarter full.
fn wakeup_flag() -> u64 {
    if EVENTS.query(BPF_RB_AVAIL_DATA) >= (EVENTS_BYTES / 4) as u64 {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    }
}

fn count_lost_event() {
    if let Some(counter) = LOST_EVENTS.get_ptr_mut(0) {
        // Per-CPU slot: no other writer while this program runs on this CPU.
        unsafe { *counter += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
