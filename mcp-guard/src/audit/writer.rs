//! The writer: one thread owns the file and commits records in groups.
//!
//! [`AuditLog::append`] serialises its record on the caller's task and queues it. The writer
//! thread takes everything queued at once, stamps each record with `seq`, `ts` and `prev`,
//! hashes it, writes the whole group with one `write`, flushes it with one `fdatasync`, and
//! only then answers every append of the group. Under concurrency groups grow, so the cost of
//! a flush is shared by more records and throughput holds.
//!
//! With `fsync` off there is no flush to share, and the hop to the writer thread and back (two
//! thread wake-ups) would cost more than the write itself: each append then stamps, hashes and
//! writes its record itself, under the lock that orders the chain (a `write` to the page
//! cache, a few microseconds).
//!
//! With `durable_before: "answer"` (and `fsync` on), a forwarded call's decision record goes
//! through [`AuditLog::append_decision`], which stamps, hashes and writes it on the caller's
//! task (under the same lock) and returns without a flush: the kernel has it, so it survives a
//! crash of mcp-guard. The call's outcome record then goes through the writer thread as usual;
//! its `fdatasync` flushes the whole file, so one flush makes both records durable before the
//! answer is returned. A file is never rotated away with records still unflushed in it.
//!
//! A failed write leaves the file as it was before the group (the writer cuts whatever part
//! of the group reached the file), fails every append of the group, and keeps the chain where
//! it was; the next group tries again. So while the disk is full or the file unwritable, every
//! append fails, and the daemon refuses the calls it would have recorded.
//!
//! After a crash (kill -9, power loss) the live file may end in an incomplete line: the part
//! of a group that reached the file before the process died. No record of that group was
//! acknowledged, so opening cuts the incomplete line off, says so in a warning (and the daemon
//! in its start-up record), and continues the chain from the last whole record. A whole last
//! line that does not check is different (an edit, not a crash): opening refuses it.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use std::time::{Duration, Instant};

use chrono::{SecondsFormat, Utc};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use prometheus::IntCounter;
use tokio::sync::{Mutex, mpsc, oneshot};

use super::chain::{self, HexHash};
use super::files::{self, Tail};
use super::record::GENESIS_PREV;
use super::{AuditError, AuditRecord};
use crate::policy::{AuditSettings, DurableBefore};

/// Records waiting for the writer; appends wait (without blocking a thread) when it is full.
const QUEUE_CAPACITY: usize = 16 * 1024;
/// A group is cut at whichever comes first, so that one write stays a bounded size.
const MAX_GROUP_RECORDS: usize = 4096;
const MAX_GROUP_BYTES: usize = 4 << 20;

/// Counters the log keeps; pass registered ones to [`AuditLog::open_with_counters`] to export
/// them.
#[derive(Clone)]
pub struct AuditCounters {
    /// Records durably written (with `durable_before: "answer"`, a decision record counts
    /// once written: the flush that follows it comes with the call's outcome record).
    pub records_written: IntCounter,
    /// Appends that failed because the log could not be written.
    pub failures: IntCounter,
}

impl Default for AuditCounters {
    /// Unregistered counters named as the daemon exports them.
    fn default() -> Self {
        Self {
            records_written: IntCounter::new(
                "mcp_guard_audit_records_written_total",
                "Audit records durably written",
            )
            .expect("a valid metric name"),
            failures: IntCounter::new(
                "mcp_guard_audit_failures_total",
                "Audit appends that failed because the log could not be written",
            )
            .expect("a valid metric name"),
        }
    }
}

/// The audit log, open for appending. Cheap to clone; the writer thread ends (after writing
/// what is queued) when the last clone is dropped.
#[derive(Clone)]
pub struct AuditLog {
    /// The writer thread's queue; `None` when appends write themselves (`fsync` off).
    queue: Option<mpsc::Sender<Pending>>,
    shared: Arc<Shared>,
}

struct Shared {
    /// The file and the chain's end. Held by the writer thread for a group's write and flush,
    /// and by an append that writes itself (`fsync` off, or a decision record written
    /// before its flush); a tokio lock, so that such an append waits for a running flush
    /// without blocking a runtime thread.
    writer: Mutex<Writer>,
    torn_bytes_cut: u64,
    settings: AuditSettings,
    counters: AuditCounters,
    failing: AtomicBool,
    /// Tests make this many upcoming writes fail halfway, as a full disk would.
    #[cfg(test)]
    fail_writes: std::sync::atomic::AtomicUsize,
}

struct Pending {
    body: Vec<u8>,
    ack: oneshot::Sender<Result<u64, AuditError>>,
}

impl AuditLog {
    /// Opens the log at `settings.path`, creating its directory and file as needed, and
    /// continues the chain from the last record of the file (or of the newest rotated file when
    /// the file is empty or missing). Refuses when that record is damaged.
    pub fn open(settings: &AuditSettings) -> Result<AuditLog, AuditError> {
        Self::open_with_counters(settings, AuditCounters::default())
    }

    /// [`Self::open`], counting into `counters`.
    pub fn open_with_counters(
        settings: &AuditSettings,
        counters: AuditCounters,
    ) -> Result<AuditLog, AuditError> {
        let writer = Writer::open(settings.clone())?;
        let torn_bytes_cut = writer.torn_bytes_cut;
        let shared = Arc::new(Shared {
            writer: Mutex::new(writer),
            torn_bytes_cut,
            settings: settings.clone(),
            counters,
            failing: AtomicBool::new(false),
            #[cfg(test)]
            fail_writes: Default::default(),
        });
        if !settings.fsync {
            return Ok(AuditLog {
                queue: None,
                shared,
            });
        }
        let (queue, receiver) = mpsc::channel(QUEUE_CAPACITY);
        let thread_shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || run(receiver, &thread_shared))
            .map_err(|source| AuditError::Io {
                what: "starting the writer thread for",
                path: settings.path.clone(),
                source,
            })?;
        Ok(AuditLog {
            queue: Some(queue),
            shared,
        })
    }

    /// Appends `record` and returns its `seq` once it is durable: written, and flushed to the
    /// disk when `fsync` is on. An error means the record is not in the log.
    pub async fn append(&self, record: AuditRecord) -> Result<u64, AuditError> {
        let body = serde_json::to_vec(&record).expect("an audit record always serialises");
        let Some(queue) = &self.queue else {
            return self.write_unflushed(&body).await;
        };
        let (ack, answer) = oneshot::channel();
        queue
            .send(Pending { body, ack })
            .await
            .map_err(|_| AuditError::Closed)?;
        answer.await.map_err(|_| AuditError::Closed)?
    }

    /// Appends the decision record of a call about to be forwarded. With `durable_before:
    /// "forward"` (or `fsync` off) this is [`Self::append`]. With `"answer"` and `fsync` on, it
    /// returns once the record is written to the file, not yet flushed: the next flushed
    /// append (the call's outcome record, which must come before its answer is returned)
    /// flushes the file and so makes this record durable too. An error means the record is
    /// not in the log.
    pub async fn append_decision(&self, record: AuditRecord) -> Result<u64, AuditError> {
        let settings = &self.shared.settings;
        if !settings.fsync || settings.durable_before == DurableBefore::Forward {
            return self.append(record).await;
        }
        let body = serde_json::to_vec(&record).expect("an audit record always serialises");
        self.write_unflushed(&body).await
    }

    /// Stamps, hashes and writes one record on the caller's task, without a flush.
    async fn write_unflushed(&self, body: &[u8]) -> Result<u64, AuditError> {
        let mut writer = self.shared.writer.lock().await;
        let result = writer.commit([body], false, &self.shared);
        writer
            .settle(result, 1, &self.shared)
            .map_err(|source| writer.write_error(source))
    }

    /// The settings the log was opened with (for [`AuditRecord::set_arguments`]).
    pub fn settings(&self) -> &AuditSettings {
        &self.shared.settings
    }

    /// Records durably written since the log was opened (by this process).
    pub fn records_written(&self) -> u64 {
        self.shared.counters.records_written.get()
    }

    /// Appends that failed because the log could not be written.
    pub fn failures(&self) -> u64 {
        self.shared.counters.failures.get()
    }

    /// True while the last write failed (until a write succeeds again).
    pub fn failing(&self) -> bool {
        self.shared.failing.load(Ordering::Relaxed)
    }

    /// Bytes of an incomplete last line that opening cut off the live file (0 normally): the
    /// remains of a write a crash interrupted, which held no acknowledged record.
    pub fn torn_bytes_cut(&self) -> u64 {
        self.shared.torn_bytes_cut
    }

    /// Flushes the live file to the disk, for a clean shutdown when `fsync` is off (with it
    /// on, every acknowledged record already is).
    pub fn sync(&self) -> Result<(), AuditError> {
        let path = &self.shared.settings.path;
        File::open(path)
            .and_then(|file| file.sync_all())
            .map_err(|source| AuditError::Io {
                what: "flushing",
                path: path.clone(),
                source,
            })
    }

    /// Flushes of the file's data so far.
    #[cfg(test)]
    pub(super) async fn flushes(&self) -> u64 {
        self.shared.writer.lock().await.flushes
    }

    /// Makes the next `writes` writes put half their bytes in the file and then fail.
    #[cfg(test)]
    pub(super) fn fail_next_writes(&self, writes: usize) {
        self.shared.fail_writes.store(writes, Ordering::SeqCst);
    }
}

/// The writer thread (`fsync` on): takes everything queued, writes it as one group with one
/// flush, and answers every append of the group.
fn run(mut queue: mpsc::Receiver<Pending>, shared: &Shared) {
    let mut group: Vec<Pending> = Vec::new();
    while let Some(first) = queue.blocking_recv() {
        let mut bytes = first.body.len();
        group.push(first);
        while group.len() < MAX_GROUP_RECORDS && bytes < MAX_GROUP_BYTES {
            match queue.try_recv() {
                Ok(pending) => {
                    bytes += pending.body.len();
                    group.push(pending);
                }
                Err(_) => break,
            }
        }
        let mut writer = shared.writer.blocking_lock();
        let result = writer.commit(group.iter().map(|p| p.body.as_slice()), true, shared);
        match writer.settle(result, group.len(), shared) {
            Ok(first_seq) => {
                for (index, pending) in group.drain(..).enumerate() {
                    let _ = pending.ack.send(Ok(first_seq + index as u64));
                }
            }
            Err(source) => {
                for pending in group.drain(..) {
                    let _ = pending
                        .ack
                        .send(Err(writer.write_error(Arc::clone(&source))));
                }
            }
        }
    }
}

/// The writer's state. `committed_len`, `next_seq` and `last_hash` describe the log as
/// it is durably on disk; they move only after a group is written and flushed.
struct Writer {
    /// Held while the writer lives: one writer per chain, across processes.
    _lock: Flock<File>,
    /// Bytes of an incomplete last line cut off at open (see [`files::cut_torn_tail`]).
    torn_bytes_cut: u64,
    path: PathBuf,
    rotate_bytes: u64,
    fsync: bool,
    /// None after a failure or a rotation: (re)opened before the next write.
    file: Option<File>,
    committed_len: u64,
    next_seq: u64,
    last_hash: HexHash,
    next_rotation: u64,
    buffer: Vec<u8>,
    /// Records were written to `file` without a flush (`durable_before: "answer"`).
    unflushed: bool,
    /// Flushes of the file's data so far (for tests).
    flushes: u64,
}

impl Writer {
    fn open(settings: AuditSettings) -> Result<Self, AuditError> {
        let path = settings.path;
        let io_error = |what, path: &Path| {
            let path = path.to_owned();
            move |source| AuditError::Io { what, path, source }
        };
        if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o750)
                .create(dir)
                .map_err(io_error("creating the directory", dir))?;
        }
        let lock = lock(&path)?;
        let torn_bytes_cut = files::cut_torn_tail(&path)
            .map_err(io_error("cutting the torn last line of", &path))?;
        if torn_bytes_cut > 0 {
            tracing::warn!(
                path = %path.display(),
                bytes = torn_bytes_cut,
                "audit log ended in an incomplete line (a write cut short by a crash); cut it \
                 off: it held no acknowledged record"
            );
        }
        let rotated = files::rotated_numbers(&path)
            .map_err(io_error("listing the rotated files beside", &path))?;
        let committed_len = match std::fs::metadata(&path) {
            Ok(metadata) => metadata.len(),
            Err(error) if error.kind() == io::ErrorKind::NotFound => 0,
            Err(error) => return Err(io_error("reading", &path)(error)),
        };
        // The chain continues from the live file's last record; a live file that is empty or
        // missing (rotation just happened) continues from the newest rotated file that has one.
        let mut candidates = vec![path.clone()];
        candidates.extend(rotated.iter().rev().map(|&n| files::rotated_path(&path, n)));
        let mut last = None;
        for candidate in &candidates {
            match files::read_tail(candidate).map_err(io_error("reading", candidate))? {
                Tail::Empty => continue,
                Tail::Record(record) => {
                    last = Some(record);
                    break;
                }
                Tail::Damaged { line, problem } => {
                    return Err(AuditError::Damaged {
                        path: candidate.clone(),
                        line,
                        problem,
                    });
                }
            }
        }
        let (next_seq, last_hash) = match last {
            Some(record) => (record.seq + 1, record.hash),
            None => (1, genesis()),
        };
        let mut writer = Writer {
            _lock: lock,
            torn_bytes_cut,
            rotate_bytes: settings.rotate_bytes,
            fsync: settings.fsync,
            file: None,
            committed_len,
            next_seq,
            last_hash,
            next_rotation: rotated.last().map_or(1, |n| n + 1),
            buffer: Vec::with_capacity(64 * 1024),
            unflushed: false,
            flushes: 0,
            path,
        };
        // Open now, so that a log the daemon cannot write stops it at start-up.
        let path = writer.path.clone();
        writer.file().map_err(io_error("opening", &path))?;
        Ok(writer)
    }

    /// Counts (and logs) how a commit of `records` went; the first record's seq, or why none
    /// of them is in the log.
    fn settle(
        &self,
        result: Result<u64, Arc<io::Error>>,
        records: usize,
        shared: &Shared,
    ) -> Result<u64, Arc<io::Error>> {
        match result {
            Ok(first_seq) => {
                shared.failing.store(false, Ordering::Relaxed);
                shared.counters.records_written.inc_by(records as u64);
                Ok(first_seq)
            }
            Err(source) => {
                shared.failing.store(true, Ordering::Relaxed);
                shared.counters.failures.inc_by(records as u64);
                tracing::error!(
                    path = %self.path.display(),
                    records,
                    error = %source,
                    "audit log write failed: the records were not written"
                );
                Err(source)
            }
        }
    }

    fn write_error(&self, source: Arc<io::Error>) -> AuditError {
        AuditError::Write {
            path: self.path.clone(),
            source,
        }
    }

    /// Writes `bodies` (serialised records) as one write, and flushes the file when `flush`
    /// and `fsync` are on; returns the first record's seq.
    fn commit<'a>(
        &mut self,
        bodies: impl IntoIterator<Item = &'a [u8]>,
        flush: bool,
        shared: &Shared,
    ) -> Result<u64, Arc<io::Error>> {
        let first_seq = self.next_seq;
        let mut seq = first_seq;
        let mut prev = self.last_hash;
        self.buffer.clear();
        for body in bodies {
            let ts = Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true);
            prev = chain::seal(&mut self.buffer, body, seq, &ts, &prev);
            seq += 1;
        }
        if let Err(error) = self.write_buffer(flush, shared) {
            // Whatever part reached the file is cut before the next write (see `file`).
            self.file = None;
            return Err(Arc::new(error));
        }
        self.committed_len += self.buffer.len() as u64;
        self.next_seq = seq;
        self.last_hash = prev;
        if self.rotate_bytes > 0
            && self.committed_len >= self.rotate_bytes
            && let Err(error) = self.rotate()
        {
            // The records are safe; the file just grows until a rotation succeeds.
            tracing::warn!(
                path = %self.path.display(),
                error = %error,
                "audit log rotation failed; will retry after the next write"
            );
        }
        Ok(first_seq)
    }

    fn write_buffer(&mut self, flush: bool, _shared: &Shared) -> io::Result<()> {
        self.file()?;
        let file = self.file.as_mut().expect("opened just above");
        #[cfg(test)]
        if _shared
            .fail_writes
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            file.write_all(&self.buffer[..self.buffer.len() / 2])?;
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        file.write_all(&self.buffer)?;
        if self.fsync {
            if flush {
                // Flushes the whole file: records written earlier without a flush too.
                file.sync_data()?;
                self.unflushed = false;
                self.flushes += 1;
            } else {
                self.unflushed = true;
            }
        }
        Ok(())
    }

    /// The open file, opening it first when needed. A file longer than the committed chain
    /// holds the remains of a failed write, which are cut; a shorter one was cut by someone
    /// else, and is not written to.
    fn file(&mut self) -> io::Result<&mut File> {
        if self.file.is_none() {
            let existed = self.path.exists();
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(&self.path)?;
            let len = file.metadata()?.len();
            if len > self.committed_len {
                file.set_len(self.committed_len)?;
                file.sync_all()?;
            } else if len < self.committed_len {
                return Err(io::Error::other(format!(
                    "the file is {len} bytes, shorter than the {} bytes already written to \
                     it: it was truncated or replaced behind mcp-guard's back",
                    self.committed_len
                )));
            }
            if !existed {
                sync_parent(&self.path)?;
            }
            self.file = Some(file);
        }
        Ok(self.file.as_mut().expect("just opened"))
    }

    /// Renames the file to the next `<path>.N` and starts a fresh one.
    fn rotate(&mut self) -> io::Result<()> {
        // The flush that would have covered them goes to the next file.
        if self.unflushed {
            self.file()?.sync_data()?;
            self.unflushed = false;
            self.flushes += 1;
        }
        let target = loop {
            let target = files::rotated_path(&self.path, self.next_rotation);
            self.next_rotation += 1;
            match rename_no_replace(&self.path, &target) {
                Ok(()) => break target,
                // Someone put a file there; never overwrite it, take the next number.
                Err(error) if error.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(error) => {
                    self.next_rotation -= 1;
                    return Err(error);
                }
            }
        };
        self.file = None;
        self.committed_len = 0;
        sync_parent(&target)?;
        tracing::info!(
            rotated = %target.display(),
            last_seq = self.next_seq - 1,
            last_hash = chain::hash_str(&self.last_hash),
            "audit log rotated"
        );
        self.file().map(drop)
    }
}

/// How long [`lock`] waits for another writer to let go (a daemon restarting while its
/// predecessor exits, say).
const LOCK_WAIT: Duration = Duration::from_millis(if cfg!(test) { 200 } else { 2000 });

/// Takes the log's lock, `<path>.lock`: two writers would fork the chain (two records with
/// the same seq and prev), so a second one is refused.
fn lock(path: &Path) -> Result<Flock<File>, AuditError> {
    let lock_path = PathBuf::from(format!("{}.lock", path.display()));
    let io_error = |source| AuditError::Io {
        what: "opening the lock file",
        path: lock_path.clone(),
        source,
    };
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .map_err(io_error)?;
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err((returned, Errno::EWOULDBLOCK)) if Instant::now() < deadline => {
                file = returned;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err((_, Errno::EWOULDBLOCK)) => {
                return Err(AuditError::InUse {
                    path: path.to_owned(),
                });
            }
            Err((_, errno)) => return Err(io_error(errno.into())),
        }
    }
}

fn genesis() -> HexHash {
    GENESIS_PREV.as_bytes().try_into().expect("64 characters")
}

/// Renames without ever replacing an existing file.
fn rename_no_replace(from: &Path, to: &Path) -> io::Result<()> {
    use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};
    match renameat2(AT_FDCWD, from, AT_FDCWD, to, RenameFlags::RENAME_NOREPLACE) {
        Ok(()) => Ok(()),
        // A filesystem without RENAME_NOREPLACE: check, then rename (racy, but only against
        // another process writing rotated names into mcp-guard's directory).
        Err(nix::errno::Errno::EINVAL) => {
            if to.exists() {
                Err(io::ErrorKind::AlreadyExists.into())
            } else {
                std::fs::rename(from, to)
            }
        }
        Err(errno) => Err(errno.into()),
    }
}

/// Makes a created or renamed directory entry durable.
fn sync_parent(path: &Path) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|dir| !dir.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    File::open(dir)?.sync_all()
}
