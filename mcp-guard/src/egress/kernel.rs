//! The kernel programs and maps: load, pin, attach (or re-use what an earlier daemon pinned),
//! and typed access to the maps.
//!
//! Pins live under the bpffs directory from the policy (default /sys/fs/bpf/mcp-guard):
//! `maps/<MAP>` for the maps, `links/<program>@<cgroup id>` for each attachment. A pinned link
//! keeps its program attached while no daemon runs, so enforcement outlives the process.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use aya::maps::{HashMap, LpmTrie, MapData, PerCpuArray, RingBuf};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, loaded_programs};
use aya::{Ebpf, EbpfLoader};
use mcp_guard_common::{AllowKey, AllowValue, GUARD_FLAG_RECORD_ONLY, GuardEntry, names};
use nix::sys::statfs::{BPF_FS_MAGIC, statfs};

use super::cgroup;

/// The compiled kernel object, built by aya-build from `mcp-guard-ebpf` (see build.rs).
fn kernel_object() -> &'static [u8] {
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mcp-guard"))
}

const DEFAULT_BPFFS_MOUNT: &str = "/sys/fs/bpf";

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(
        "kernel egress enforcement needs {missing} (effective capabilities lack it): run as root or under the packaged systemd unit, or pass --no-egress to run without kernel enforcement"
    )]
    MissingCapabilities { missing: String },
    #[error(
        "{path} is not on a bpf filesystem: mount one with `mount -t bpf bpf {path}` or choose a path under /sys/fs/bpf"
    )]
    NotBpffs { path: PathBuf },
    #[error("mounting bpffs at {DEFAULT_BPFFS_MOUNT}: {0}")]
    Mount(nix::Error),
    #[error(
        "loading the eBPF object: {0} (pinned maps from an incompatible version? run `mcp-guard egress teardown`)"
    )]
    Load(String),
    #[error("eBPF program {program}: {message}")]
    Program {
        program: &'static str,
        message: String,
    },
    #[error("eBPF map {map}: {message}")]
    Map { map: &'static str, message: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> KernelError + '_ {
    move |source| KernelError::Io {
        path: path.to_owned(),
        source,
    }
}

/// How an attachment came to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attachment {
    /// A previous daemon's programs, identical to ours, are attached and stay.
    Reused,
    /// Nothing was attached; ours now are.
    Attached,
    /// Different (older) programs were attached; ours replaced them with no gap.
    Replaced,
}

/// Where pins live under the configured bpffs directory.
#[derive(Clone, Debug)]
pub struct PinLayout {
    pub root: PathBuf,
}

impl PinLayout {
    pub fn maps_dir(&self) -> PathBuf {
        self.root.join("maps")
    }

    pub fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }

    fn link(&self, program: &str, cgroup_id: u64) -> PathBuf {
        self.links_dir().join(format!("{program}@{cgroup_id}"))
    }

    /// True when the maps of an earlier daemon are pinned here.
    pub fn has_pinned_maps(&self) -> bool {
        self.maps_dir().join(names::GUARDED_CGROUPS).exists()
    }

    /// The pinned link files (`program@cgroup-id`).
    pub fn pinned_links(&self) -> Vec<String> {
        let Ok(entries) = fs::read_dir(self.links_dir()) else {
            return Vec::new();
        };
        let mut links: Vec<String> = entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect();
        links.sort();
        links
    }
}

/// The loaded object and typed handles on its maps.
pub struct KernelPrograms {
    ebpf: Ebpf,
    pins: PinLayout,
    pub guarded: HashMap<MapData, u64, GuardEntry>,
    pub allow: LpmTrie<MapData, AllowKey, AllowValue>,
    pub lost: PerCpuArray<MapData, u64>,
    events: Option<RingBuf<MapData>>,
    programs_loaded: bool,
}

impl KernelPrograms {
    /// Loads the object, re-using maps pinned by an earlier daemon (their contents are the
    /// enforcement state that kept running while no daemon did).
    pub fn load(pins: PinLayout) -> Result<KernelPrograms, KernelError> {
        check_capabilities()?;
        ensure_bpffs(&pins.root)?;
        fs::create_dir_all(pins.maps_dir()).map_err(io_error(&pins.maps_dir()))?;
        fs::create_dir_all(pins.links_dir()).map_err(io_error(&pins.links_dir()))?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pins.maps_dir())
            .load(kernel_object())
            .map_err(|e| KernelError::Load(crate::error_chain(&e)))?;
        let guarded = HashMap::try_from(take_map(&mut ebpf, names::GUARDED_CGROUPS)?)
            .map_err(map_error(names::GUARDED_CGROUPS))?;
        let allow = LpmTrie::try_from(take_map(&mut ebpf, names::ALLOW_LIST)?)
            .map_err(map_error(names::ALLOW_LIST))?;
        let lost = PerCpuArray::try_from(take_map(&mut ebpf, names::LOST_EVENTS)?)
            .map_err(map_error(names::LOST_EVENTS))?;
        let events = RingBuf::try_from(take_map(&mut ebpf, names::EVENTS)?)
            .map_err(map_error(names::EVENTS))?;
        Ok(KernelPrograms {
            ebpf,
            pins,
            guarded,
            allow,
            lost,
            events: Some(events),
            programs_loaded: false,
        })
    }

    /// The ring buffer, handed once to the event reader.
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }

    /// Events the kernel dropped because the ring buffer was full, over all CPUs, since the
    /// maps were created.
    pub fn lost_events(&self) -> Result<u64, KernelError> {
        let per_cpu = self
            .lost
            .get(&0, 0)
            .map_err(map_error(names::LOST_EVENTS))?;
        Ok(per_cpu.iter().sum())
    }

    /// Makes sure our four programs judge every socket call in `cgroup_path` and below.
    pub fn attach(&mut self, cgroup_path: &Path) -> Result<Attachment, KernelError> {
        let cgroup_id = cgroup::cgroup_id(cgroup_path)?;
        self.load_programs()?;
        let previous = self.pinned_program_tags(cgroup_id);
        let ours = self.program_tags()?;
        if previous
            .iter()
            .zip(&ours)
            .all(|(old, new)| *old == Some(*new))
        {
            return Ok(Attachment::Reused);
        }
        let had_previous = previous.iter().any(Option::is_some);
        self.attach_and_pin(cgroup_path, cgroup_id)?;
        Ok(if had_previous {
            Attachment::Replaced
        } else {
            Attachment::Attached
        })
    }

    fn load_programs(&mut self) -> Result<(), KernelError> {
        if self.programs_loaded {
            return Ok(());
        }
        for name in names::PROGRAMS {
            self.program_mut(name)?
                .load()
                .map_err(|e| program_error(name, &e))?;
        }
        self.programs_loaded = true;
        Ok(())
    }

    fn program_mut(&mut self, name: &'static str) -> Result<&mut CgroupSockAddr, KernelError> {
        let program = self.ebpf.program_mut(name).ok_or(KernelError::Program {
            program: name,
            message: "missing from the object".into(),
        })?;
        program.try_into().map_err(|e| program_error(name, &e))
    }

    /// Kernel tags (hashes of the instructions) of our loaded programs, in `PROGRAMS` order.
    fn program_tags(&mut self) -> Result<Vec<u64>, KernelError> {
        let mut tags = Vec::new();
        for name in names::PROGRAMS {
            let info = self
                .program_mut(name)?
                .info()
                .map_err(|e| program_error(name, &e))?;
            tags.push(info.tag());
        }
        Ok(tags)
    }

    /// Tags of the programs behind the pinned links for `cgroup_id`, `None` where none is pinned.
    fn pinned_program_tags(&self, cgroup_id: u64) -> Vec<Option<u64>> {
        names::PROGRAMS
            .iter()
            .map(|name| {
                let link =
                    FdLink::from(PinnedLink::from_pin(self.pins.link(name, cgroup_id)).ok()?);
                let program_id = link.info().ok()?.program_id();
                loaded_programs()
                    .filter_map(Result::ok)
                    .find(|p| p.id() == program_id)
                    .map(|p| p.tag())
            })
            .collect()
    }

    /// Attaches alongside whatever is there, pins, then drops the old links, so there is no
    /// instant without enforcement. Link-based cgroup attachments always coexist (every
    /// attached program must allow); the kernel refuses any mode flag on them, hence `Single`.
    fn attach_and_pin(&mut self, cgroup_path: &Path, cgroup_id: u64) -> Result<(), KernelError> {
        for name in names::PROGRAMS {
            let cgroup_dir = File::open(cgroup_path).map_err(io_error(cgroup_path))?;
            let final_pin = self.pins.link(name, cgroup_id);
            // bpffs refuses names with a dot.
            let staged_pin = self
                .pins
                .links_dir()
                .join(format!("staged-{name}@{cgroup_id}"));
            let program = self.program_mut(name)?;
            let link_id = program
                .attach(cgroup_dir, CgroupAttachMode::Single)
                .map_err(|e| program_error(name, &e))?;
            let link = program
                .take_link(link_id)
                .map_err(|e| program_error(name, &e))?;
            let fd_link = FdLink::try_from(link).map_err(|e| program_error(name, &e))?;
            let _ = fs::remove_file(&staged_pin);
            fd_link
                .pin(&staged_pin)
                .map_err(|e| program_error(name, &e))?;
            // Replacing the old pin releases the old link, which detaches the old program.
            fs::rename(&staged_pin, &final_pin).map_err(io_error(&final_pin))?;
        }
        Ok(())
    }

    /// Drops the attachment to one cgroup (an adopted cgroup the policy no longer names).
    pub fn detach(&self, cgroup_id: u64) -> Result<(), KernelError> {
        for name in names::PROGRAMS {
            let pin = self.pins.link(name, cgroup_id);
            match fs::remove_file(&pin) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(KernelError::Io { path: pin, source }),
            }
        }
        Ok(())
    }

    /// Cgroup ids that have pinned attachments.
    pub fn attached_cgroups(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self
            .pins
            .pinned_links()
            .iter()
            .filter_map(|l| l.rsplit_once('@')?.1.parse().ok())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, KernelError> {
    ebpf.take_map(name).ok_or(KernelError::Map {
        map: name,
        message: "missing from the object".into(),
    })
}

fn map_error(map: &'static str) -> impl FnOnce(aya::maps::MapError) -> KernelError {
    move |e| KernelError::Map {
        map,
        message: crate::error_chain(&e),
    }
}

fn program_error(program: &'static str, err: &(dyn std::error::Error + 'static)) -> KernelError {
    KernelError::Program {
        program,
        message: crate::error_chain(err),
    }
}

/// CAP_BPF for maps and programs, CAP_NET_ADMIN to attach cgroup socket programs,
/// CAP_SYS_ADMIN to mount bpffs and for the cgroup hierarchy.
fn check_capabilities() -> Result<(), KernelError> {
    const NEEDED: [(u32, &str); 3] = [
        (39, "CAP_BPF"),
        (12, "CAP_NET_ADMIN"),
        (21, "CAP_SYS_ADMIN"),
    ];
    let effective = effective_capabilities().unwrap_or(0);
    let missing: Vec<&str> = NEEDED
        .iter()
        .filter(|(bit, _)| effective & (1u64 << bit) == 0)
        .map(|(_, name)| *name)
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(KernelError::MissingCapabilities {
            missing: missing.join(", "),
        })
    }
}

fn effective_capabilities() -> Option<u64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// Mounts bpffs at /sys/fs/bpf when that is where the pins go and nothing is mounted there
/// (this kernel does not mount it at boot).
fn ensure_bpffs(pin_root: &Path) -> Result<(), KernelError> {
    let existing = pin_root
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    if is_bpffs(existing) {
        return Ok(());
    }
    let default_mount = Path::new(DEFAULT_BPFFS_MOUNT);
    if pin_root.starts_with(default_mount) && existing == default_mount {
        nix::mount::mount(
            Some("bpf"),
            default_mount,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(KernelError::Mount)?;
        return Ok(());
    }
    Err(KernelError::NotBpffs {
        path: existing.to_owned(),
    })
}

fn is_bpffs(path: &Path) -> bool {
    statfs(path).is_ok_and(|s| s.filesystem_type() == BPF_FS_MAGIC)
}

/// Removes every pin (which detaches the programs and frees the maps once no process holds
/// them) and the directory itself.
pub fn remove_pins(pins: &PinLayout) -> Result<(), KernelError> {
    // Links first, so programs stop judging before the maps they read are released.
    for dir in [pins.links_dir(), pins.maps_dir()] {
        remove_files_in(&dir)?;
    }
    match fs::remove_dir_all(&pins.root) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(KernelError::Io {
            path: pins.root.clone(),
            source,
        }),
    }
}

fn remove_files_in(dir: &Path) -> Result<(), KernelError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(KernelError::Io {
                path: dir.to_owned(),
                source,
            });
        }
    };
    for entry in entries {
        let path = entry.map_err(io_error(dir))?.path();
        fs::remove_file(&path).map_err(io_error(&path))?;
    }
    Ok(())
}

/// What is pinned under a bpffs directory, read without loading or attaching anything.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PinnedState {
    pub pinned: bool,
    /// Pinned links, `program@cgroup-id`.
    pub programs: Vec<String>,
    pub guarded_cgroups: usize,
    /// Guarded cgroups whose server runs in shadow or learn mode: what no rule allows is
    /// reported and let through.
    pub record_only_cgroups: usize,
    pub allow_prefixes: usize,
    pub lost_events: u64,
}

pub fn pinned_state(pins: &PinLayout) -> Result<PinnedState, KernelError> {
    if !pins.has_pinned_maps() {
        return Ok(PinnedState {
            pinned: false,
            programs: pins.pinned_links(),
            guarded_cgroups: 0,
            record_only_cgroups: 0,
            allow_prefixes: 0,
            lost_events: 0,
        });
    }
    let open =
        |name: &'static str| MapData::from_pin(pins.maps_dir().join(name)).map_err(map_error(name));
    let guarded: HashMap<MapData, u64, GuardEntry> =
        HashMap::try_from(aya::maps::Map::HashMap(open(names::GUARDED_CGROUPS)?))
            .map_err(map_error(names::GUARDED_CGROUPS))?;
    let allow: LpmTrie<MapData, AllowKey, AllowValue> =
        LpmTrie::try_from(aya::maps::Map::LpmTrie(open(names::ALLOW_LIST)?))
            .map_err(map_error(names::ALLOW_LIST))?;
    let lost: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(aya::maps::Map::PerCpuArray(open(names::LOST_EVENTS)?))
            .map_err(map_error(names::LOST_EVENTS))?;
    let lost_events = lost
        .get(&0, 0)
        .map_err(map_error(names::LOST_EVENTS))?
        .iter()
        .sum();
    Ok(PinnedState {
        pinned: true,
        programs: pins.pinned_links(),
        guarded_cgroups: guarded.keys().count(),
        record_only_cgroups: guarded
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, entry)| entry.flags & GUARD_FLAG_RECORD_ONLY != 0)
            .count(),
        allow_prefixes: allow.keys().count(),
        lost_events,
    })
}
