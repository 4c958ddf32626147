//! Turns a policy's per-server `egress` rules into what the kernel enforces, with host names
//! replaced by the addresses they currently resolve to.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;

use super::resolve::HostResolver;
use super::{AllowEntry, ServerEgress};
use crate::policy::{Destination, EgressRule, Policy, Protocol};

/// Every host name any server's egress rules mention.
pub fn host_names(policy: &Policy) -> BTreeSet<String> {
    policy
        .servers
        .values()
        .flat_map(|server| &server.egress)
        .filter_map(|rule| match rule.destination()? {
            Destination::Host(host) => Some(host),
            Destination::Cidr(_) => None,
        })
        .collect()
}

/// The allow-list and mode of every server in the policy. Rule ids are the rule's position in
/// the server's `egress` list; `Egress::apply` renumbers them host-wide.
pub fn server_egress(policy: &Policy, resolver: &HostResolver) -> BTreeMap<String, ServerEgress> {
    policy
        .servers
        .iter()
        .map(|(name, server)| {
            let mut wanted = ServerEgress {
                adopt_cgroup: server.adopt_cgroup.clone(),
                record_only: server.effective_mode(policy.mode).lets_everything_through(),
                ..ServerEgress::default()
            };
            for (index, rule) in server.egress.iter().enumerate() {
                let rule_id = index as u32 + 1;
                wanted
                    .rule_names
                    .insert(rule_id, format!("{name}/egress/{}", rule.id));
                wanted.entries.extend(entries_for(rule, rule_id, resolver));
                if let Some(Destination::Host(host)) = rule.destination() {
                    for addr in resolver.addresses(&host) {
                        wanted.hosts.entry(addr).or_insert_with(|| host.clone());
                    }
                    wanted.rule_hosts.insert(rule_id, host);
                }
            }
            (name.clone(), wanted)
        })
        .collect()
}

fn entries_for(rule: &EgressRule, rule_id: u32, resolver: &HostResolver) -> Vec<AllowEntry> {
    let nets: Vec<IpNet> = match rule.destination() {
        Some(Destination::Cidr(net)) => vec![net],
        Some(Destination::Host(host)) => resolver
            .addresses(&host)
            .into_iter()
            .map(IpNet::from)
            .collect(),
        // A rule naming both or neither allows nothing (validation refuses it anyway).
        None => Vec::new(),
    };
    let tcp = rule.allows_protocol(Protocol::Tcp);
    let udp = rule.allows_protocol(Protocol::Udp);
    nets.iter()
        .flat_map(|net| {
            rule.port_ranges().iter().map(move |ports| AllowEntry {
                net: *net,
                ports: ports.range(),
                tcp,
                udp,
                rule_id,
            })
        })
        .collect()
}
