//! Kernel egress enforcement: each MCP server process runs in a cgroup mcp-guard guards, and
//! the eBPF programs let it reach only the destinations its policy declares.
//!
//! Layout on the host:
//! - cgroups: `<cgroup root>/<server>/<session>` (one per agent session), plus cgroups adopted
//!   from services mcp-guard does not spawn;
//! - pins: `<bpffs>/maps/*`, `<bpffs>/links/<program>@<cgroup id>`.
//!
//! A policy generation gets fresh policy ids: the new allow-lists are written first, each
//! guarded cgroup is switched to its new id in one map update, then the old entries go. A
//! cgroup therefore always sees one complete allow-list, old or new. The same update carries
//! the server's mode: a record-only cgroup (shadow, learn) has what no rule allows reported
//! as `would_refuse` and let through.

pub mod allowlist;
pub mod cgroup;
pub mod events;
pub mod from_policy;
pub mod kernel;
pub mod resolve;
pub mod spawn;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use mcp_guard_common::{GUARD_FLAG_RECORD_ONLY, GuardEntry};

pub use allowlist::AllowEntry;
pub use events::{EgressAttempt, EventReader};
pub use kernel::{Attachment, KernelError, PinLayout};

/// The policy id no allow-list entry ever uses: cgroups of servers the policy no longer names
/// are switched to it (enforcing), so they reach nothing.
const DENY_ALL: GuardEntry = GuardEntry {
    policy_id: 0,
    flags: 0,
};

#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
    #[error("server {server}: {source}")]
    AllowList {
        server: String,
        source: allowlist::AllowListError,
    },
    #[error("server {0:?} is not in the policy")]
    UnknownServer(String),
    #[error("eBPF map update: {0}")]
    MapUpdate(String),
}

/// Where enforcement lives on this host.
#[derive(Clone, Debug)]
pub struct EgressLayout {
    /// mcp-guard's own cgroup subtree; the programs attach here.
    pub cgroup_root: PathBuf,
    pub pins: PinLayout,
}

impl EgressLayout {
    /// The configured paths, with the cgroup root defaulting to `<cgroup2 mount>/mcp-guard`.
    pub fn new(bpffs: PathBuf, cgroup_root: Option<PathBuf>) -> Result<EgressLayout, EgressError> {
        let mount = cgroup::cgroup2_mount()?;
        let cgroup_root = cgroup_root.unwrap_or_else(|| mount.join("mcp-guard"));
        cgroup::check_inside_cgroup2(&cgroup_root, &mount)?;
        Ok(EgressLayout {
            cgroup_root,
            pins: PinLayout { root: bpffs },
        })
    }
}

/// What the policy wants for one server's network.
#[derive(Clone, Debug, Default)]
pub struct ServerEgress {
    pub entries: Vec<AllowEntry>,
    /// Printable name of each `rule_id` used in `entries` (`server/egress/<rule id>`).
    pub rule_names: BTreeMap<u32, String>,
    /// The policy `host` of each host rule, by the same ids.
    pub rule_hosts: BTreeMap<u32, String>,
    /// An existing cgroup (a service mcp-guard does not spawn) to guard with this allow-list.
    pub adopt_cgroup: Option<PathBuf>,
    /// Shadow or learn mode: what no rule allows is reported and let through.
    pub record_only: bool,
    /// The policy `host` each address in `entries` was resolved from (the first such host
    /// when several resolve to it), for the records of connections to it.
    pub hosts: BTreeMap<IpAddr, String>,
}

/// Who a guarded cgroup belongs to: the key for attributing kernel events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupOwner {
    pub server: Arc<str>,
    /// `None` for an adopted cgroup, which is not tied to one agent session.
    pub session: Option<Arc<str>>,
    pub path: PathBuf,
}

/// Names the event reader needs to attribute events, shared with it.
#[derive(Debug, Default)]
pub struct Directory {
    pub owners: HashMap<u64, CgroupOwner>,
    pub rules: HashMap<u32, Arc<str>>,
    /// Per server, the policy `host` behind each address resolved for its egress rules.
    pub hosts: HashMap<Arc<str>, HashMap<IpAddr, Arc<str>>>,
    /// The policy `host` of each host rule, by (host-wide) rule id: the host a connection that
    /// rule allowed went to, even where several hosts resolve to its address.
    pub rule_hosts: HashMap<u32, Arc<str>>,
}

impl Directory {
    /// Puts a policy generation's rule names (and hosts) in force beside those already known:
    /// rule ids are never reused, and events a replaced generation decided may still be in the
    /// ring, to be named by its rules until [`Directory::forget_rules`].
    fn add_rules(&mut self, names: HashMap<u32, Arc<str>>, hosts: HashMap<u32, Arc<str>>) {
        self.rules.extend(names);
        self.rule_hosts.extend(hosts);
    }

    fn forget_rules(&mut self, ids: &[u32]) {
        for id in ids {
            self.rules.remove(id);
            self.rule_hosts.remove(id);
        }
    }
}

pub type SharedDirectory = Arc<RwLock<Directory>>;

/// A session cgroup handed to whoever spawns the server process.
#[derive(Clone, Debug)]
pub struct SessionCgroup {
    pub server: String,
    pub session: String,
    pub path: PathBuf,
    pub cgroup_id: u64,
}

/// What `status` reports.
#[derive(Clone, Debug, serde::Serialize)]
pub struct EgressStatus {
    pub cgroup_root: PathBuf,
    pub bpffs: PathBuf,
    pub attached_cgroups: Vec<u64>,
    pub guarded_cgroups: usize,
    pub allow_prefixes: usize,
    pub lost_events: u64,
}

pub struct Egress {
    kernel: kernel::KernelPrograms,
    layout: EgressLayout,
    directory: SharedDirectory,
    /// Current guard entry (policy id and flags) per server.
    guards: BTreeMap<String, GuardEntry>,
    /// Adopted cgroup id per server.
    adopted: BTreeMap<String, u64>,
    next_policy_id: u32,
    next_rule_id: u32,
    next_session: u64,
    /// Session cgroups whose opener (a control connection) is still there: never swept, even
    /// while empty, since the opener may not have started its process yet.
    held: HashSet<u64>,
    /// Owners of removed cgroups, kept a while so events still in the ring are attributed.
    retired: Vec<(u64, Instant)>,
    /// The rule ids of the policy generation in force.
    rules_in_force: Vec<u32>,
    /// Rule ids of replaced generations, kept a while so events still in the ring name them.
    retired_rules: Vec<(Vec<u32>, Instant)>,
}

/// How long the owner of a removed cgroup, or the rules of a replaced policy generation, stay
/// known to the event reader.
const RETIRED_OWNER_TTL: Duration = Duration::from_secs(30);

impl Egress {
    /// Loads (or re-uses) the kernel programs and maps, attaches them at the cgroup root, and
    /// takes over the session cgroups an earlier daemon left.
    pub fn start(layout: EgressLayout) -> Result<(Egress, Attachment), EgressError> {
        let mut kernel = kernel::KernelPrograms::load(layout.pins.clone())?;
        cgroup::ensure_dir(&layout.cgroup_root)?;
        let attachment = kernel.attach(&layout.cgroup_root)?;
        let (max_policy_id, max_rule_id) = max_ids_in_use(&kernel);
        let mut egress = Egress {
            kernel,
            layout,
            directory: SharedDirectory::default(),
            guards: BTreeMap::new(),
            adopted: BTreeMap::new(),
            next_policy_id: max_policy_id + 1,
            next_rule_id: max_rule_id + 1,
            next_session: 0,
            held: HashSet::new(),
            retired: Vec::new(),
            rules_in_force: Vec::new(),
            retired_rules: Vec::new(),
        };
        egress.take_over_session_cgroups()?;
        Ok((egress, attachment))
    }

    pub fn layout(&self) -> &EgressLayout {
        &self.layout
    }

    pub fn directory(&self) -> SharedDirectory {
        self.directory.clone()
    }

    /// The event reader over the kernel's ring buffer (once).
    pub fn event_reader(&mut self) -> Option<EventReader> {
        let ring = self.kernel.take_events()?;
        Some(EventReader::new(ring, self.directory.clone()))
    }

    pub fn lost_events(&self) -> Result<u64, EgressError> {
        Ok(self.kernel.lost_events()?)
    }

    /// Installs a whole policy generation. Every server's allow-list compiles before the kernel
    /// is touched, so an error leaves the running generation in force.
    pub fn apply(&mut self, servers: &BTreeMap<String, ServerEgress>) -> Result<(), EgressError> {
        let mut compiled = Vec::new();
        let mut rule_names = HashMap::new();
        let mut rule_hosts = HashMap::new();
        let mut hosts = HashMap::new();
        let mut new_guards = BTreeMap::new();
        for (server, wanted) in servers {
            let policy_id = self.allocate_policy_id();
            let (entries, renumbered) = self.renumber_rules(wanted);
            let trie = allowlist::compile(policy_id, &entries).map_err(|source| {
                EgressError::AllowList {
                    server: server.clone(),
                    source,
                }
            })?;
            compiled.push(trie);
            for (id, local_id) in renumbered {
                let name = wanted
                    .rule_names
                    .get(&local_id)
                    .cloned()
                    .unwrap_or_else(|| format!("{server}/egress/#{local_id}"));
                rule_names.insert(id, Arc::from(name));
                if let Some(host) = wanted.rule_hosts.get(&local_id) {
                    rule_hosts.insert(id, Arc::from(host.as_str()));
                }
            }
            let flags = if wanted.record_only {
                GUARD_FLAG_RECORD_ONLY
            } else {
                0
            };
            new_guards.insert(server.clone(), GuardEntry { policy_id, flags });
            let resolved = wanted
                .hosts
                .iter()
                .map(|(addr, host)| (*addr, Arc::from(host.as_str())))
                .collect();
            hosts.insert(Arc::from(server.as_str()), resolved);
        }
        // A cgroup to adopt that is not there refuses the generation before anything changes.
        let adopted = adopted_cgroups(servers)?;
        // Entries under the new policy ids decide nothing until the guards point at them.
        for (key, value) in compiled.iter().flatten() {
            self.kernel
                .allow
                .insert(key, value, 0)
                .map_err(|e| EgressError::MapUpdate(crate::error_chain(&e)))?;
        }
        self.sync_adopted_cgroups(adopted)?;
        let in_force = rule_names.keys().copied().collect();
        let replaced = std::mem::replace(&mut self.rules_in_force, in_force);
        if !replaced.is_empty() {
            self.retired_rules.push((replaced, Instant::now()));
        }
        {
            let mut directory = self.directory.write().expect("directory lock");
            directory.add_rules(rule_names, rule_hosts);
            directory.hosts = hosts;
        }
        self.guards = new_guards;
        self.switch_guarded_cgroups()?;
        self.remove_stale_allow_entries()?;
        Ok(())
    }

    /// Gives each entry a host-unique rule id (events name rules by it); the entries, and each
    /// new id with the server's own id of its rule.
    fn renumber_rules(&mut self, wanted: &ServerEgress) -> (Vec<AllowEntry>, Vec<(u32, u32)>) {
        let mut ids: HashMap<u32, u32> = HashMap::new();
        let mut renumbered = Vec::new();
        let entries = wanted
            .entries
            .iter()
            .map(|entry| {
                let id = *ids.entry(entry.rule_id).or_insert_with(|| {
                    let id = self.next_rule_id;
                    self.next_rule_id += 1;
                    renumbered.push((id, entry.rule_id));
                    id
                });
                AllowEntry {
                    rule_id: id,
                    ..entry.clone()
                }
            })
            .collect();
        (entries, renumbered)
    }

    fn allocate_policy_id(&mut self) -> u32 {
        let id = self.next_policy_id;
        self.next_policy_id = self.next_policy_id.wrapping_add(1).max(1);
        id
    }

    fn guard_of(&self, server: &str) -> GuardEntry {
        self.guards.get(server).copied().unwrap_or(DENY_ALL)
    }

    /// Points every guarded cgroup at its server's current allow-list and mode.
    fn switch_guarded_cgroups(&mut self) -> Result<(), EgressError> {
        let owners: Vec<(u64, Arc<str>)> = {
            let directory = self.directory.read().expect("directory lock");
            directory
                .owners
                .iter()
                .map(|(id, owner)| (*id, owner.server.clone()))
                .collect()
        };
        for (cgroup_id, server) in owners {
            if !self.retired.iter().any(|(id, _)| *id == cgroup_id) {
                self.guard(cgroup_id, self.guard_of(&server))?;
            }
        }
        Ok(())
    }

    fn guard(&mut self, cgroup_id: u64, entry: GuardEntry) -> Result<(), EgressError> {
        self.kernel
            .guarded
            .insert(cgroup_id, entry, 0)
            .map_err(|e| EgressError::MapUpdate(crate::error_chain(&e)))
    }

    fn unguard(&mut self, cgroup_id: u64) -> Result<(), EgressError> {
        match self.kernel.guarded.remove(&cgroup_id) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(EgressError::MapUpdate(crate::error_chain(&e))),
        }
    }

    fn remove_stale_allow_entries(&mut self) -> Result<(), EgressError> {
        let live: HashSet<u32> = self.guards.values().map(|g| g.policy_id).collect();
        let stale: Vec<_> = self
            .kernel
            .allow
            .keys()
            .filter_map(Result::ok)
            .filter(|key| !live.contains(&u32::from_be(key.data().policy_id_be)))
            .collect();
        for key in stale {
            match self.kernel.allow.remove(&key) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(EgressError::MapUpdate(crate::error_chain(&e))),
            }
        }
        Ok(())
    }

    /// Attaches to the cgroups the policy adopts (see [`adopted_cgroups`]) and lets go of
    /// those it no longer names.
    fn sync_adopted_cgroups(
        &mut self,
        wanted: BTreeMap<String, AdoptedCgroup>,
    ) -> Result<(), EgressError> {
        let dropped: Vec<(String, u64)> = self
            .adopted
            .iter()
            .filter(|(server, _)| !wanted.contains_key(*server))
            .map(|(s, id)| (s.clone(), *id))
            .collect();
        for (server, cgroup_id) in dropped {
            self.kernel.detach(cgroup_id)?;
            self.unguard(cgroup_id)?;
            self.forget_owner(cgroup_id);
            self.adopted.remove(&server);
        }
        for (server, AdoptedCgroup { path, cgroup_id }) in wanted {
            if !path.starts_with(&self.layout.cgroup_root) {
                self.kernel.attach(&path)?;
            }
            self.record_owner(cgroup_id, &server, None, path);
            self.adopted.insert(server, cgroup_id);
        }
        Ok(())
    }

    /// Creates and guards the cgroup for one agent session of `server`. The caller puts the
    /// server process into `path` before it runs (see `spawn`).
    pub fn open_session(
        &mut self,
        server: &str,
        session: Option<&str>,
    ) -> Result<SessionCgroup, EgressError> {
        let Some(&entry) = self.guards.get(server) else {
            return Err(EgressError::UnknownServer(server.to_owned()));
        };
        let session = match session {
            Some(s) => cgroup::checked_name(s)?.to_owned(),
            None => self.fresh_session_name(),
        };
        let path = self
            .layout
            .cgroup_root
            .join(cgroup::checked_name(server)?)
            .join(&session);
        cgroup::ensure_dir(&path)?;
        let cgroup_id = cgroup::cgroup_id(&path)?;
        // Registered before anyone can be placed in it: the first connect is already judged.
        self.record_owner(cgroup_id, server, Some(&session), path.clone());
        self.guard(cgroup_id, entry)?;
        self.held.insert(cgroup_id);
        Ok(SessionCgroup {
            server: server.to_owned(),
            session,
            path,
            cgroup_id,
        })
    }

    fn fresh_session_name(&mut self) -> String {
        self.next_session += 1;
        format!("s{}-{}", std::process::id(), self.next_session)
    }

    /// Kills whatever still runs in a session's cgroup (what its server started and left
    /// behind): for an MCP session that has ended, nothing in it may outlive it. The cgroup
    /// stays guarded until a sweep finds it empty.
    pub fn kill_session_processes(&self, cgroup_id: u64) -> Result<(), EgressError> {
        match self.owner(cgroup_id) {
            Some(owner) if owner.session.is_some() => Ok(cgroup::kill_processes(&owner.path)?),
            _ => Ok(()),
        }
    }

    /// The opener of a session is gone: the session ends now if its processes have, else at a
    /// later sweep once they have.
    pub fn release_session(&mut self, cgroup_id: u64) -> Result<bool, EgressError> {
        self.held.remove(&cgroup_id);
        self.close_session(cgroup_id)
    }

    /// Ends a session whose processes are gone: removes its cgroup and its guard entry. A
    /// cgroup that still holds processes stays guarded and is left for a later sweep.
    fn close_session(&mut self, cgroup_id: u64) -> Result<bool, EgressError> {
        let Some(owner) = self.owner(cgroup_id) else {
            return Ok(true);
        };
        if self.retired.iter().any(|(id, _)| *id == cgroup_id) {
            return Ok(true);
        }
        if owner.session.is_none() || cgroup::is_populated(&owner.path)? {
            return Ok(false);
        }
        cgroup::remove_empty_tree(&owner.path)?;
        self.unguard(cgroup_id)?;
        self.retired.push((cgroup_id, Instant::now()));
        Ok(true)
    }

    /// Closes every session cgroup that no longer holds a process and whose opener is gone,
    /// and forgets owners and rules retired long enough ago.
    pub fn sweep_empty_sessions(&mut self) -> Result<usize, EgressError> {
        self.forget_retired(Instant::now());
        let retired: HashSet<u64> = self.retired.iter().map(|(id, _)| *id).collect();
        let sessions: Vec<u64> = {
            let directory = self.directory.read().expect("directory lock");
            directory
                .owners
                .iter()
                .filter(|(id, o)| {
                    o.session.is_some() && !self.held.contains(id) && !retired.contains(id)
                })
                .map(|(id, _)| *id)
                .collect()
        };
        let mut closed = 0;
        for cgroup_id in sessions {
            if self.close_session(cgroup_id)? {
                closed += 1;
            }
        }
        Ok(closed)
    }

    fn forget_retired(&mut self, now: Instant) {
        for cgroup_id in take_expired(&mut self.retired, now) {
            self.forget_owner(cgroup_id);
        }
        let rules = take_expired(&mut self.retired_rules, now);
        let mut directory = self.directory.write().expect("directory lock");
        for ids in rules {
            directory.forget_rules(&ids);
        }
    }

    fn owner(&self, cgroup_id: u64) -> Option<CgroupOwner> {
        let directory = self.directory.read().expect("directory lock");
        directory.owners.get(&cgroup_id).cloned()
    }

    fn record_owner(&self, cgroup_id: u64, server: &str, session: Option<&str>, path: PathBuf) {
        let owner = CgroupOwner {
            server: Arc::from(server),
            session: session.map(Arc::from),
            path,
        };
        let mut directory = self.directory.write().expect("directory lock");
        directory.owners.insert(cgroup_id, owner);
    }

    fn forget_owner(&self, cgroup_id: u64) {
        let mut directory = self.directory.write().expect("directory lock");
        directory.owners.remove(&cgroup_id);
    }

    /// After a restart: session cgroups with processes in them are ours again (they stayed
    /// guarded meanwhile); empty ones are removed; guard entries for cgroups that are gone
    /// are dropped.
    fn take_over_session_cgroups(&mut self) -> Result<(), EgressError> {
        let root = self.layout.cgroup_root.clone();
        for server_dir in cgroup::children(&root)? {
            let server = file_name(&server_dir);
            for session_dir in cgroup::children(&server_dir)? {
                if cgroup::is_populated(&session_dir)? {
                    let cgroup_id = cgroup::cgroup_id(&session_dir)?;
                    let session = file_name(&session_dir);
                    self.record_owner(cgroup_id, &server, Some(&session), session_dir);
                } else {
                    cgroup::remove_empty_tree(&session_dir)?;
                }
            }
        }
        let live: HashSet<u64> = self
            .directory
            .read()
            .expect("directory lock")
            .owners
            .keys()
            .copied()
            .collect();
        let attached: HashSet<u64> = self.kernel.attached_cgroups().into_iter().collect();
        let stale: Vec<u64> = self
            .kernel
            .guarded
            .keys()
            .filter_map(Result::ok)
            // Adopted cgroups are re-registered by `apply`; keep their entries until then.
            .filter(|id| !live.contains(id) && !attached.contains(id))
            .collect();
        for cgroup_id in stale {
            self.unguard(cgroup_id)?;
        }
        Ok(())
    }

    pub fn status(&self) -> Result<EgressStatus, EgressError> {
        Ok(EgressStatus {
            cgroup_root: self.layout.cgroup_root.clone(),
            bpffs: self.layout.pins.root.clone(),
            attached_cgroups: self.kernel.attached_cgroups(),
            guarded_cgroups: self.kernel.guarded.keys().count(),
            allow_prefixes: self.kernel.allow.keys().count(),
            lost_events: self.kernel.lost_events()?,
        })
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The highest policy id and rule id present in the (possibly re-used) maps, so a new daemon
/// never reuses an id an earlier one still has installed.
fn max_ids_in_use(kernel: &kernel::KernelPrograms) -> (u32, u32) {
    let mut max_policy = kernel
        .guarded
        .iter()
        .filter_map(Result::ok)
        .map(|(_, entry)| entry.policy_id)
        .max()
        .unwrap_or(0);
    let mut max_rule = 0;
    for (key, value) in kernel.allow.iter().filter_map(Result::ok) {
        max_policy = max_policy.max(u32::from_be(key.data().policy_id_be));
        let rules = &value.rules[..(value.count as usize).min(value.rules.len())];
        max_rule = rules.iter().map(|r| r.rule_id).fold(max_rule, u32::max);
    }
    (max_policy, max_rule)
}

/// Removes everything enforcement left on the host: pins (detaching the programs) and the
/// cgroup subtree (killing what still runs in it).
pub fn teardown(layout: &EgressLayout) -> Result<(), EgressError> {
    kernel::remove_pins(&layout.pins)?;
    cgroup::remove_tree(&layout.cgroup_root)?;
    Ok(())
}

/// A cgroup a server's policy adopts (`adopt_cgroup`), with its id.
struct AdoptedCgroup {
    path: PathBuf,
    cgroup_id: u64,
}

/// The cgroups the servers adopt, by server; an error names the first that is not there.
fn adopted_cgroups(
    servers: &BTreeMap<String, ServerEgress>,
) -> Result<BTreeMap<String, AdoptedCgroup>, EgressError> {
    let mut adopted = BTreeMap::new();
    for (server, wanted) in servers {
        if let Some(path) = &wanted.adopt_cgroup {
            let cgroup_id = cgroup::cgroup_id(path)?;
            let path = path.clone();
            adopted.insert(server.clone(), AdoptedCgroup { path, cgroup_id });
        }
    }
    Ok(adopted)
}

/// Removes from `retired` what was retired at least [`RETIRED_OWNER_TTL`] before `now`.
fn take_expired<T>(retired: &mut Vec<(T, Instant)>, now: Instant) -> Vec<T> {
    let (expired, kept): (Vec<_>, Vec<_>) = retired
        .drain(..)
        .partition(|(_, at)| now.duration_since(*at) >= RETIRED_OWNER_TTL);
    *retired = kept;
    expired.into_iter().map(|(item, _)| item).collect()
}
