//! The writer: a call alone writes and flushes its own record; under load, records are
//! written and flushed in groups.
//!
//! Records are stamped with `seq`, `ts` and `prev`, hashed and written under the lock that
//! orders the chain, which is held for microseconds and never across a flush. With `fsync` on,
//! [`AuditLog::append`] returns once an `fdatasync` made its record durable:
//!
//! - If no flush is running, the append writes its record (with any queued meanwhile) and runs
//!   the `fdatasync` itself, on its own thread. A call alone waits for the disk and nothing
//!   else: no hand-off to another thread (a dedicated writer thread cost two thread wake-ups
//!   per flush, more than the flush itself on a busy 2-CPU machine). On tokio's
//!   multi-threaded runtime the flush runs in `block_in_place`, so the runtime moves the
//!   worker's other tasks elsewhere while it waits for the disk.
//! - If one is running, the append queues its record for the next flush. When a flush ends
//!   with records queued, a blocking thread takes them all, writes them with one `write`,
//!   flushes them with one `fdatasync`, answers their appends, and goes on group after group
//!   for as long as records queue: the old writer thread, now only under load. Groups grow with
//!   concurrency, so the cost of a write and a flush is shared by more records and throughput
//!   holds.
//!
//! With `fsync` off appends return once written.
//!
//! With `durable_before: "answer"` (and `fsync` on), a forwarded call's decision record goes
//! through [`AuditLog::append_decision`], which writes it at once (never queued) and returns:
//! the kernel has it, so it survives a crash of mcp-guard. The call's outcome record then
//! waits for a flush as usual; `fdatasync` flushes the whole file, so one flush makes both
//! records durable before the answer is returned. A file is rotated away only after a flush.
//!
//! With `durable_before: "interval"` (and `fsync` on), no append waits for the disk: each
//! returns once its records are written, and a background thread flushes the file
//! `flush_interval_ms` after the first record it has not flushed yet was written. If that
//! flush fails, appends are refused (as if the file could not be written) until a retry, one
//! interval later, succeeds: the daemon does not go on acting while what it already recorded
//! may not reach the disk. Dropping the log flushes what is left.
//!
//! A failed write leaves the file as it was before it (whatever part reached the file is cut
//! before the next write), fails every append of its group, and keeps the chain where it was;
//! the next write tries again. So while the disk is full or the file unwritable, every append
//! fails, and the daemon refuses the calls it would have recorded. A failed flush fails every
//! append of its group; their records stay in the file (the chain runs through them). A later
//! flush would not cover them: when writeback fails, Linux reports the error once and marks the
//! pages clean, so the bytes may never reach the disk while later flushes succeed. So the
//! writer keeps the bytes written since the last successful flush, and after a failed one
//! truncates the file back to what that flush made durable and writes them again before the
//! next write or flush. If flushes keep failing while writes succeed, the kept bytes are capped
//! ([`MAX_UNFLUSHED_BYTES`]): past the cap, a write first flushes what is kept, and is refused
//! if that fails too.
//!
//! After a crash (kill -9, power loss) the live file may end in an incomplete line: the part
//! of a write that reached the file before the process died. No record of that write was
//! acknowledged, so opening cuts the incomplete line off, says so in a warning (and the daemon
//! in its start-up record), and continues the chain from the last whole record. A whole last
//! line that does not check is different (an edit, not a crash): opening refuses it.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use chrono::{SecondsFormat, Utc};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use prometheus::{IntCounter, IntGauge};
use tokio::runtime::{Handle, RuntimeFlavor};
use tokio::sync::oneshot;

use super::chain::{self, HexHash};
use super::files::{self, Tail};
use super::record::GENESIS_PREV;
use super::{AuditError, AuditRecord};
use crate::policy::{AuditSettings, DurableBefore};

/// Counters the log keeps; pass registered ones to [`AuditLog::open_with_counters`] to export
/// them.
#[derive(Clone)]
pub struct AuditCounters {
    /// Records durably written (with `durable_before: "answer"`, a decision record counts
    /// once written: the flush that follows it comes with the call's outcome record; with
    /// `"interval"`, every record counts once written).
    pub records_written: IntCounter,
    /// Appends that failed because the log could not be written.
    pub failures: IntCounter,
    /// Flushes (`fdatasync`) of the log that failed, the background flusher's included.
    pub flush_failures: IntCounter,
    /// Bytes written to the log and not yet made durable by a flush (with `fsync` on).
    pub unflushed_bytes: IntGauge,
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
            flush_failures: IntCounter::new(
                "mcp_guard_audit_flush_failures_total",
                "Flushes (fdatasync) of the audit log that failed",
            )
            .expect("a valid metric name"),
            unflushed_bytes: IntGauge::new(
                "mcp_guard_audit_unflushed_bytes",
                "Bytes written to the audit log and not yet flushed (fdatasync)",
            )
            .expect("a valid metric name"),
        }
    }
}

/// The audit log, open for appending. Cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    shared: Arc<Shared>,
}

struct Shared {
    /// The file and the chain's end: held to stamp and write records, never across a flush.
    writer: Mutex<Writer>,
    /// Whether a flush is running, and the records queued for the next.
    flushes: Mutex<Flushes>,
    torn_bytes_cut: u64,
    settings: AuditSettings,
    counters: AuditCounters,
    failing: AtomicBool,
    /// With `durable_before: "interval"`, what the background flusher has to do.
    background: Option<Arc<Background>>,
    /// Tests make this many upcoming writes fail halfway, as a full disk would.
    #[cfg(test)]
    fail_writes: std::sync::atomic::AtomicUsize,
    /// Tests make this many upcoming flushes fail, as a failing disk would.
    #[cfg(test)]
    fail_flushes: std::sync::atomic::AtomicUsize,
}

#[derive(Default)]
struct Flushes {
    /// A flush is running (or about to: handed to the flusher thread).
    running: bool,
    /// Appends waiting for the next flush to write and flush their records, in order.
    queued: Vec<Queued>,
    /// Flushes so far (for tests).
    count: u64,
}

struct Queued {
    bodies: Vec<Vec<u8>>,
    /// Gets the first seq of `bodies` once they are durable, or why they are not.
    sender: oneshot::Sender<Result<u64, AuditError>>,
}

/// What an append does about its records when `fsync` is on.
enum Next {
    /// Write and flush them itself: no flush is running.
    Run(Vec<Vec<u8>>),
    /// Wait for the running flush's successor to write and flush them.
    Wait(oneshot::Receiver<Result<u64, AuditError>>),
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
        let writer = Writer::open(settings.clone(), counters.unflushed_bytes.clone())?;
        let background = (settings.fsync && settings.durable_before == DurableBefore::Interval)
            .then(|| Arc::new(Background::every(settings.flush_interval_ms)));
        let shared = Arc::new(Shared {
            torn_bytes_cut: writer.torn_bytes_cut,
            flushes: Default::default(),
            writer: Mutex::new(writer),
            settings: settings.clone(),
            counters,
            failing: AtomicBool::new(false),
            background: background.clone(),
            #[cfg(test)]
            fail_writes: Default::default(),
            #[cfg(test)]
            fail_flushes: Default::default(),
        });
        if let Some(background) = background {
            let log = Arc::downgrade(&shared);
            std::thread::Builder::new()
                .name("audit-flush".into())
                .spawn(move || flush_in_the_background(&log, &background))
                .map_err(|source| AuditError::Io {
                    what: "starting the background flush of",
                    path: settings.path.clone(),
                    source,
                })?;
        }
        Ok(AuditLog { shared })
    }

    /// Appends `record` and returns its `seq` once it is durable: written, and flushed to the
    /// disk when `fsync` is on (with `durable_before: "interval"`, written; the flush comes
    /// later). An error means the record is not in the log.
    pub async fn append(&self, record: AuditRecord) -> Result<u64, AuditError> {
        let appended = self.append_bodies(vec![serialise(&record)]).await;
        self.settle(appended, 1)
    }

    /// Appends `records` together (one write and one flush), and returns their first `seq`
    /// once they are durable; the others follow it in order.
    pub async fn append_all(&self, records: &[AuditRecord]) -> Result<u64, AuditError> {
        if records.is_empty() {
            return Ok(self.lock_writer().next_seq);
        }
        let appended = self
            .append_bodies(records.iter().map(serialise).collect())
            .await;
        self.settle(appended, records.len())
    }

    /// Appends the decision record of a call about to be forwarded. With `durable_before:
    /// "forward"` (or `fsync` off) this is [`Self::append`]. With `"answer"` and `fsync` on, it
    /// returns once the record is written to the file, not yet flushed: the next flush (the one
    /// the call's outcome record waits for before its answer is returned) makes this record
    /// durable too. An error means the record is not in the log.
    pub async fn append_decision(&self, record: AuditRecord) -> Result<u64, AuditError> {
        if self.shared.settings.durable_before != DurableBefore::Answer {
            return self.append(record).await;
        }
        let written = self.write(&[serialise(&record)]);
        self.settle(written, 1)
    }

    /// Stamps, hashes and writes `bodies` with one write; the first one's seq.
    fn write(&self, bodies: &[Vec<u8>]) -> Result<u64, AuditError> {
        let slices: Vec<&[u8]> = bodies.iter().map(Vec::as_slice).collect();
        self.write_slices(&slices)
            .map(|(first, _)| first)
            .map_err(|source| self.write_error(source))
    }

    /// [`Self::write`], also returning what a flush of the records is to flush.
    fn write_slices(&self, bodies: &[&[u8]]) -> Result<(u64, FlushTarget), Arc<io::Error>> {
        let mut writer = self.lock_writer();
        let written = writer
            .commit(bodies.iter().copied(), &self.shared)
            .and_then(|first| Ok((first, writer.flush_target().map_err(Arc::new)?)));
        if let Err(source) = &written {
            tracing::error!(
                path = %writer.path.display(),
                records = bodies.len(),
                error = %source,
                "audit log write failed: the records were not written"
            );
        }
        written
    }

    /// Appends `bodies` and returns the first one's seq once they are durable. With `fsync`
    /// on and no flush running, this append writes and flushes them itself (taking along what
    /// queued meanwhile); with one running, they queue for the next, which writes everything
    /// queued with one write and flushes it with one `fdatasync`.
    async fn append_bodies(&self, bodies: Vec<Vec<u8>>) -> Result<u64, AuditError> {
        if !self.shared.settings.fsync {
            return self.write(&bodies);
        }
        if let Some(background) = &self.shared.background {
            return self.write_and_flush_later(&bodies, background);
        }
        let next = {
            let mut flushes = self.lock_flushes();
            if flushes.running {
                let (sender, written) = oneshot::channel();
                flushes.queued.push(Queued { bodies, sender });
                Next::Wait(written)
            } else {
                flushes.running = true;
                Next::Run(bodies)
            }
        };
        match next {
            Next::Wait(durable) => durable.await.map_err(|_| AuditError::Closed)?,
            Next::Run(bodies) => {
                let durable = self.write_and_flush(&bodies);
                self.hand_on();
                durable
            }
        }
    }

    /// Writes `own` and everything queued with one write, flushes the file, and answers the
    /// queued appends; the first seq of `own` (meaningless when it is empty), once durable.
    fn write_and_flush(&self, own: &[Vec<u8>]) -> Result<u64, AuditError> {
        let queued = std::mem::take(&mut self.lock_flushes().queued);
        let all: Vec<&[u8]> = own
            .iter()
            .chain(queued.iter().flat_map(|q| &q.bodies))
            .map(Vec::as_slice)
            .collect();
        let durable = self.write_slices(&all).and_then(|(first, target)| {
            self.flush(&target)?;
            Ok(first)
        });
        let mut seq = durable.as_ref().map_or(0, |first| first + own.len() as u64);
        for queued in queued {
            let answer = match &durable {
                Ok(_) => Ok(seq),
                Err(source) => Err(self.write_error(Arc::clone(source))),
            };
            seq += queued.bodies.len() as u64;
            let _ = queued.sender.send(answer);
        }
        durable.map_err(|source| self.write_error(source))
    }

    /// Writes `bodies` and leaves their flush to the background flusher; refused while its
    /// last flush failed.
    fn write_and_flush_later(
        &self,
        bodies: &[Vec<u8>],
        background: &Background,
    ) -> Result<u64, AuditError> {
        if let Some(failed) = background.failure() {
            return Err(self.write_error(failed));
        }
        let first = self.write(bodies)?;
        background.written();
        Ok(first)
    }

    /// Flushes the live file (the background flusher's flush).
    fn flush_live_file(&self) -> Result<(), Arc<io::Error>> {
        let target = self.lock_writer().flush_target().map_err(Arc::new)?;
        self.flush(&target)
    }

    fn write_error(&self, source: Arc<io::Error>) -> AuditError {
        AuditError::Write {
            path: self.shared.settings.path.clone(),
            source,
        }
    }

    /// Flushes the file of `target` (the live file when its records were written), and tells
    /// the writer how that went.
    fn flush(&self, target: &FlushTarget) -> Result<(), Arc<io::Error>> {
        let flushed = outside_the_runtime(|| sync_data(&target.file, &self.shared));
        self.lock_writer().flushed(target, flushed.is_ok());
        match flushed {
            Ok(()) => {
                self.lock_flushes().count += 1;
                Ok(())
            }
            Err(error) => {
                tracing::error!(
                    path = %self.shared.settings.path.display(),
                    error = %error,
                    "audit log flush failed: the records waiting for it were not made durable"
                );
                Err(Arc::new(error))
            }
        }
    }

    /// Ends the running flush, or, with appends queued, runs the next flushes on a blocking
    /// thread until none is left queued. Under load that thread writes and flushes group
    /// after group, as a dedicated writer thread would, and appends are not kept waiting for
    /// one of them to be scheduled (behind every other append the last flush woke).
    fn hand_on(&self) {
        let mut flushes = self.lock_flushes();
        if flushes.queued.is_empty() {
            flushes.running = false;
            return;
        }
        drop(flushes);
        let log = self.clone();
        let flusher = move || log.flush_while_queued();
        match Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(flusher)),
            Err(_) => drop(std::thread::spawn(flusher)),
        }
    }

    fn flush_while_queued(&self) {
        loop {
            {
                let mut flushes = self.lock_flushes();
                if flushes.queued.is_empty() {
                    flushes.running = false;
                    return;
                }
            }
            let _ = self.write_and_flush(&[]);
        }
    }

    /// Counts how an append of `records` went.
    fn settle<T>(&self, result: Result<T, AuditError>, records: usize) -> Result<T, AuditError> {
        let records = records as u64;
        match &result {
            Ok(_) => {
                self.shared.failing.store(false, Ordering::Relaxed);
                self.shared.counters.records_written.inc_by(records);
            }
            Err(_) => {
                self.shared.failing.store(true, Ordering::Relaxed);
                self.shared.counters.failures.inc_by(records);
            }
        }
        result
    }

    fn lock_writer(&self) -> MutexGuard<'_, Writer> {
        locked(&self.shared.writer)
    }

    fn lock_flushes(&self) -> MutexGuard<'_, Flushes> {
        locked(&self.shared.flushes)
    }

    /// The settings the log was opened with (for [`AuditRecord::set_arguments`]).
    pub fn settings(&self) -> &AuditSettings {
        &self.shared.settings
    }

    /// Records durably written since the log was opened (by this process).
    pub fn records_written(&self) -> u64 {
        self.shared.counters.records_written.get()
    }

    /// Bytes written and not yet flushed, as exported (`mcp_guard_audit_unflushed_bytes`).
    pub fn unflushed_bytes(&self) -> i64 {
        self.shared.counters.unflushed_bytes.get()
    }

    /// Appends that failed because the log could not be written.
    pub fn failures(&self) -> u64 {
        self.shared.counters.failures.get()
    }

    /// Flushes of the log that failed.
    pub fn flush_failures(&self) -> u64 {
        self.shared.counters.flush_failures.get()
    }

    /// True while the last append failed (until one succeeds again).
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

    /// Flushes of the file's data so far (rotations included).
    #[cfg(test)]
    pub(super) fn flushes(&self) -> u64 {
        self.lock_flushes().count + self.lock_writer().rotation_flushes
    }

    /// Appends waiting for the next flush.
    #[cfg(test)]
    pub(super) fn queued(&self) -> usize {
        self.lock_flushes().queued.len()
    }

    /// Marks a flush as running, as a slow one would be, until the guard is dropped; then
    /// the appends waiting get the next.
    #[cfg(test)]
    pub(super) fn hold_flush(&self) -> impl Drop + '_ {
        struct Held<'a>(&'a AuditLog);
        impl Drop for Held<'_> {
            fn drop(&mut self) {
                self.0.hand_on();
            }
        }
        self.lock_flushes().running = true;
        Held(self)
    }

    /// Makes the next `writes` writes put half their bytes in the file and then fail.
    #[cfg(test)]
    pub(super) fn fail_next_writes(&self, writes: usize) {
        self.shared.fail_writes.store(writes, Ordering::SeqCst);
    }

    /// Makes the next `flushes` flushes fail with EIO.
    #[cfg(test)]
    pub(super) fn fail_next_flushes(&self, flushes: usize) {
        self.shared.fail_flushes.store(flushes, Ordering::SeqCst);
    }
}

/// A lock whose holder panicked is still good: every holder leaves its state consistent
/// before anything that can panic.
fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The background flush of `durable_before: "interval"`.
struct Background {
    state: Mutex<BackgroundState>,
    /// Signalled when the first unflushed record is written, and when the log is dropped.
    wake: Condvar,
    interval: Duration,
}

#[derive(Default)]
struct BackgroundState {
    /// When the oldest record not yet flushed was written.
    unflushed_since: Option<Instant>,
    /// Why the last flush failed, until one succeeds.
    failed: Option<Arc<io::Error>>,
    /// The log was dropped.
    stopped: bool,
}

impl Background {
    fn every(interval_ms: u64) -> Self {
        Self {
            state: Default::default(),
            wake: Condvar::new(),
            interval: Duration::from_millis(interval_ms),
        }
    }

    fn failure(&self) -> Option<Arc<io::Error>> {
        locked(&self.state).failed.clone()
    }

    /// Notes records written; the first one since the last flush starts the interval.
    fn written(&self) {
        let mut state = locked(&self.state);
        if state.unflushed_since.is_none() {
            state.unflushed_since = Some(Instant::now());
            self.wake.notify_one();
        }
    }

    /// Waits until a flush is due (true), or the log is dropped (false). A due flush covers
    /// every record written before this returns.
    fn wait_until_due(&self) -> bool {
        let mut state = locked(&self.state);
        loop {
            if state.stopped {
                return false;
            }
            let Some(since) = state.unflushed_since else {
                state = self
                    .wake
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
                continue;
            };
            let now = Instant::now();
            let due = since + self.interval;
            if now >= due {
                state.unflushed_since = None;
                return true;
            }
            state = self
                .wake
                .wait_timeout(state, due - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Notes how a flush went: a failed one is retried an interval later, and appends are
    /// refused meanwhile.
    fn flushed(&self, result: Result<(), Arc<io::Error>>) {
        let mut state = locked(&self.state);
        match result {
            Ok(()) => state.failed = None,
            Err(error) => {
                state.failed = Some(error);
                state.unflushed_since.get_or_insert_with(Instant::now);
            }
        }
    }

    /// Stops the flusher; whether records are left unflushed.
    fn stop(&self) -> bool {
        let mut state = locked(&self.state);
        state.stopped = true;
        self.wake.notify_one();
        state.unflushed_since.is_some() || state.failed.is_some()
    }
}

/// The background flusher's thread: flushes the live file whenever a flush is due, until the
/// log is dropped. It holds the log only while flushing, so that dropping the last
/// [`AuditLog`] drops the log.
fn flush_in_the_background(log: &Weak<Shared>, background: &Background) {
    while background.wait_until_due() {
        let Some(shared) = log.upgrade() else { return };
        background.flushed(AuditLog { shared }.flush_live_file());
    }
}

impl Drop for Shared {
    /// Flushes what the background flusher has not flushed yet.
    fn drop(&mut self) {
        let Some(background) = &self.background else {
            return;
        };
        if !background.stop() {
            return;
        }
        let writer = self
            .writer
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        let path = writer.path.clone();
        let flushed = writer
            .file()
            .cloned()
            .and_then(|file| sync_data(&file, self));
        if let Err(error) = flushed {
            tracing::error!(
                path = %path.display(),
                error = %error,
                "audit log flush failed at close: the last records may not be on the disk"
            );
        }
    }
}

/// `fdatasync` of `file`, counting failures; tests make it fail as a failing disk would.
fn sync_data(file: &File, shared: &Shared) -> io::Result<()> {
    #[cfg(test)]
    let synced = if take_one(&shared.fail_flushes) {
        Err(io::Error::from_raw_os_error(libc::EIO))
    } else {
        file.sync_data()
    };
    #[cfg(not(test))]
    let synced = file.sync_data();
    if synced.is_err() {
        shared.counters.flush_failures.inc();
    }
    synced
}

/// Takes one from a test's count of failures to come; false when none is left.
#[cfg(test)]
fn take_one(failures: &std::sync::atomic::AtomicUsize) -> bool {
    failures
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

fn serialise(record: &AuditRecord) -> Vec<u8> {
    serde_json::to_vec(record).expect("an audit record always serialises")
}

/// Runs `blocking` (a flush) on this thread, telling tokio's multi-threaded runtime first so
/// that it moves this worker's other tasks to another thread meanwhile. On a current-thread
/// runtime (the stdio front, tests) there is nothing to move; on a blocking thread (the
/// flusher of [`AuditLog::hand_on`]) `block_in_place` just runs it.
fn outside_the_runtime<T>(blocking: impl FnOnce() -> T) -> T {
    match Handle::try_current().map(|handle| handle.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(blocking),
        _ => blocking(),
    }
}

/// The writer's state. `committed_len`, `next_seq` and `last_hash` describe the log as it is
/// in the file; they move once a write succeeds (durability is the flushes' business: see the
/// module's documentation).
struct Writer {
    /// Held while the writer lives: one writer per chain, across processes.
    _lock: Flock<File>,
    /// Bytes of an incomplete last line cut off at open (see [`files::cut_torn_tail`]).
    torn_bytes_cut: u64,
    path: PathBuf,
    rotate_bytes: u64,
    fsync: bool,
    /// None after a failure or a rotation: (re)opened before the next write. Shared with a
    /// flush running outside the lock.
    file: Option<Arc<File>>,
    committed_len: u64,
    next_seq: u64,
    last_hash: HexHash,
    next_rotation: u64,
    buffer: Vec<u8>,
    /// Flushes of a file about to be rotated away (for tests).
    rotation_flushes: u64,
    /// With `fsync` on: the length of the live file that a flush made durable, and the bytes
    /// written after it, kept to write again after a failed flush (see the module's
    /// documentation).
    durable_len: u64,
    unflushed: Vec<u8>,
    /// Exports `unflushed.len()`: a flush that falls behind or keeps failing shows there.
    unflushed_gauge: IntGauge,
    /// A flush failed: the bytes after `durable_len` are to be written again before anything
    /// else is written or flushed.
    rewrite_needed: bool,
    version: FileVersion,
}

/// Which bytes of which live file a flush covers: a flush started before a rotation or a
/// rewrite says nothing about the file as it is after it.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
struct FileVersion {
    rotations: u64,
    rewrites: u64,
}

/// What a flush is to flush: the live file, up to `len`, as of `version`.
struct FlushTarget {
    file: Arc<File>,
    version: FileVersion,
    len: u64,
}

/// The most bytes kept for writing again while flushes fail (see the module's documentation).
const MAX_UNFLUSHED_BYTES: usize = if cfg!(test) { 4096 } else { 64 * 1024 * 1024 };

impl Writer {
    fn open(settings: AuditSettings, unflushed_gauge: IntGauge) -> Result<Self, AuditError> {
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
            rotation_flushes: 0,
            durable_len: committed_len,
            unflushed: Vec::new(),
            unflushed_gauge,
            rewrite_needed: false,
            version: FileVersion::default(),
            path,
        };
        // Open now, so that a log the daemon cannot write stops it at start-up; and flush, so
        // that what the last writer left is durable before the chain goes on from it.
        let path = writer.path.clone();
        let fsync = writer.fsync;
        let file = writer.file().map_err(io_error("opening", &path))?;
        if fsync && committed_len > 0 {
            file.sync_data().map_err(io_error("flushing", &path))?;
        }
        Ok(writer)
    }

    /// Writes `bodies` (serialised records) as one write; returns the first record's seq.
    fn commit<'a>(
        &mut self,
        bodies: impl IntoIterator<Item = &'a [u8]>,
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
        if let Err(error) = self
            .rewrite_if_needed()
            .and_then(|()| self.make_room_to_keep(shared))
            .and_then(|()| self.write_buffer(shared))
        {
            // Whatever part reached the file is cut before the next write (see `file`).
            self.file = None;
            return Err(Arc::new(error));
        }
        self.committed_len += self.buffer.len() as u64;
        if self.fsync {
            self.unflushed.extend_from_slice(&self.buffer);
            self.export_unflushed();
        }
        self.next_seq = seq;
        self.last_hash = prev;
        if self.rotate_bytes > 0
            && self.committed_len >= self.rotate_bytes
            && let Err(error) = self.rotate(shared)
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

    /// Makes room to keep the buffer's bytes for writing again, by flushing here what is kept
    /// when that is over [`MAX_UNFLUSHED_BYTES`]: flushes have failed for a long while. Refuses
    /// the write when that flush fails too.
    fn make_room_to_keep(&mut self, shared: &Shared) -> io::Result<()> {
        if !self.fsync || self.unflushed.len() + self.buffer.len() <= MAX_UNFLUSHED_BYTES {
            return Ok(());
        }
        let target = self.flush_target()?;
        let flushed = sync_data(&target.file, shared);
        self.flushed(&target, flushed.is_ok());
        flushed.map_err(|error| {
            io::Error::new(
                error.kind(),
                format!(
                    "{} bytes were written since the last successful flush of the audit log, \
                     and flushing them failed ({error}): refusing to write more until a flush \
                     succeeds",
                    self.unflushed.len()
                ),
            )
        })
    }

    /// After a failed flush, truncates the file back to what the last successful one made
    /// durable and writes the bytes after it again.
    fn rewrite_if_needed(&mut self) -> io::Result<()> {
        if !self.rewrite_needed {
            return Ok(());
        }
        let file = self.shared_file()?;
        file.set_len(self.durable_len)?;
        (&*file).write_all(&self.unflushed)?;
        self.rewrite_needed = false;
        self.version.rewrites += 1;
        tracing::warn!(
            path = %self.path.display(),
            bytes = self.unflushed.len(),
            "audit log: wrote again what was written since the last successful flush, which a \
             failed flush may have lost"
        );
        Ok(())
    }

    /// What a flush started now is to flush (writing again first what a failed flush may have
    /// lost).
    fn flush_target(&mut self) -> io::Result<FlushTarget> {
        self.rewrite_if_needed()?;
        Ok(FlushTarget {
            file: self.shared_file()?,
            version: self.version,
            len: self.committed_len,
        })
    }

    /// Takes note of how a flush of `target` went.
    fn flushed(&mut self, target: &FlushTarget, succeeded: bool) {
        if target.version.rotations != self.version.rotations {
            // That file was flushed before it was rotated away.
            return;
        }
        if !succeeded {
            self.rewrite_needed = true;
        } else if target.version == self.version
            && !self.rewrite_needed
            && target.len > self.durable_len
        {
            let newly_durable = (target.len - self.durable_len) as usize;
            self.unflushed.drain(..newly_durable);
            self.durable_len = target.len;
            self.export_unflushed();
        }
    }

    fn export_unflushed(&self) {
        self.unflushed_gauge
            .set(i64::try_from(self.unflushed.len()).unwrap_or(i64::MAX));
    }

    fn write_buffer(&mut self, _shared: &Shared) -> io::Result<()> {
        let file = self.shared_file()?;
        let mut file: &File = &file;
        #[cfg(test)]
        if take_one(&_shared.fail_writes) {
            file.write_all(&self.buffer[..self.buffer.len() / 2])?;
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        file.write_all(&self.buffer)
    }

    /// The open file (see [`Self::file`]), to write or flush without holding the writer.
    fn shared_file(&mut self) -> io::Result<Arc<File>> {
        self.file().map(Arc::clone)
    }

    /// The open file, opening it first when needed. A file longer than the committed chain
    /// holds the remains of a failed write, which are cut; a shorter one was cut by someone
    /// else, and is not written to.
    fn file(&mut self) -> io::Result<&Arc<File>> {
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
            } else if len < self.committed_len && !(self.rewrite_needed && len >= self.durable_len)
            {
                return Err(io::Error::other(format!(
                    "the file is {len} bytes, shorter than the {} bytes already written to \
                     it: it was truncated or replaced behind mcp-guard's back",
                    self.committed_len
                )));
            }
            if !existed {
                sync_parent(&self.path)?;
            }
            self.file = Some(Arc::new(file));
        }
        Ok(self.file.as_ref().expect("just opened"))
    }

    /// Renames the file to the next `<path>.N` and starts a fresh one.
    fn rotate(&mut self, shared: &Shared) -> io::Result<()> {
        // Records not yet flushed may be in it; a flush running meanwhile flushes this file
        // too, but one starting later flushes the next.
        if self.fsync {
            if let Err(error) = sync_data(self.file()?, shared) {
                self.rewrite_needed = true;
                return Err(error);
            }
            self.rotation_flushes += 1;
            self.unflushed.clear();
            self.export_unflushed();
            self.durable_len = self.committed_len;
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
        self.durable_len = 0;
        self.version.rotations += 1;
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
