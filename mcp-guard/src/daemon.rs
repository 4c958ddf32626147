//! `mcp-guard run`: loads the policy, sets up kernel egress enforcement, serves the control
//! socket and metrics, and reacts to signals (SIGHUP or a changed policy file: reload;
//! SIGTERM/SIGINT: stop taking calls, let those in flight finish within
//! `daemon.shutdown_grace_seconds`, end the sessions and exit, leaving the pinned programs
//! enforcing). Under systemd it reports each of these steps (see [`crate::service`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{Mutex, mpsc};

use crate::audit::{Attribution, AuditLog, AuditRecord, RecordKind};
use crate::control;
use crate::egress::resolve::{HostResolver, Resolution, ResolveError};
use crate::egress::{
    Attachment, Egress, EgressAttempt, EgressError, EgressLayout, ServerEgress, from_policy,
};
use crate::metrics::{self, Metrics};
use crate::policy::{
    AuditSettings, CompiledPolicy, DaemonSettings, LoadedPolicy, Mode, Policy, PolicyError,
    WatchedFiles,
};
use crate::proxy::record::Recorder;
use crate::proxy::{CallSpan, Placement, Proxy};
use crate::service::Notifier;
use crate::transport::tls::{self, FrontCertificate, TlsError};
use crate::transport::{http, serve};

const SWEEP_INTERVAL: Duration = Duration::from_secs(10);
const POLL_INTERVAL: Duration = Duration::from_secs(1);
const EVENT_CHANNEL_CAPACITY: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Egress(#[from] EgressError),
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error(transparent)]
    Control(#[from] control::ControlError),
    #[error("metrics listener {addr}: {source}")]
    Metrics {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("installing signal handlers: {0}")]
    Signals(std::io::Error),
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
    #[error("MCP listener {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// Command-line settings that override the policy's `daemon` section.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub bpffs: Option<PathBuf>,
    pub cgroup_root: Option<PathBuf>,
    pub control_socket: Option<PathBuf>,
    pub metrics_listen: Option<SocketAddr>,
    pub listen: Option<SocketAddr>,
    /// Overrides the policy's `audit.path`.
    pub audit_path: Option<PathBuf>,
}

impl Overrides {
    pub fn apply_audit(&self, settings: &mut AuditSettings) {
        if let Some(path) = &self.audit_path {
            settings.path = path.clone();
        }
    }

    pub fn apply(&self, settings: &mut DaemonSettings) {
        if let Some(bpffs) = &self.bpffs {
            settings.bpffs = bpffs.clone();
        }
        if let Some(root) = &self.cgroup_root {
            settings.cgroup_root = Some(root.clone());
        }
        if let Some(socket) = &self.control_socket {
            settings.control_socket = socket.clone();
        }
        if let Some(addr) = self.metrics_listen {
            settings.metrics_listen = Some(addr);
        }
        if let Some(addr) = self.listen {
            settings.listen = Some(addr);
        }
    }
}

pub struct RunOptions {
    pub policy_path: PathBuf,
    pub no_egress: bool,
    pub overrides: Overrides,
    /// Use the cgroup the daemon was started in (delegated by systemd) as the cgroup root, the
    /// daemon itself moving into its `daemon` leaf.
    pub delegated_cgroup: bool,
    /// The service manager to report readiness, reloads and stopping to (systemd's
    /// `Type=notify`); inactive outside systemd.
    pub service: Notifier,
}

/// Kernel enforcement as the running daemon holds it.
struct Enforcement {
    egress: Arc<Mutex<Egress>>,
    resolver: HostResolver,
    /// The policy in force, re-compiled when its host names resolve differently.
    policy: Policy,
    /// Kernel events, until the recorder takes them.
    events: Option<mpsc::Receiver<EgressAttempt>>,
}

/// The policy the daemon starts with, read once, before its runtime: `daemon.worker_threads`
/// sizes that runtime, and [`run`] starts on this policy.
pub fn starting_policy(path: &Path) -> Result<LoadedPolicy, DaemonError> {
    Ok(load_policy(path)?)
}

pub async fn run(options: RunOptions, loaded: LoadedPolicy) -> Result<(), DaemonError> {
    let mut settings = loaded.policy.daemon.clone();
    options.overrides.apply(&mut settings);
    // The policy's own `listen` was warned about when it loaded; `--listen` was not.
    if let Some(warning) = options
        .overrides
        .listen
        .and_then(|listen| crate::policy::cleartext_front_warning(listen, &settings))
    {
        tracing::warn!("--listen {warning}");
    }
    if options.delegated_cgroup && !options.no_egress {
        let root = crate::egress::cgroup::enter_delegated_subtree().map_err(EgressError::from)?;
        tracing::info!(cgroup_root = %root.display(), "using the delegated cgroup subtree");
        settings.cgroup_root = Some(root);
    }
    let metrics = Metrics::new();

    let mut enforcement = if options.no_egress {
        tracing::warn!(
            "KERNEL EGRESS ENFORCEMENT IS OFF (--no-egress): MCP server processes can reach any network destination"
        );
        None
    } else {
        Some(start_enforcement(&loaded.policy, &settings, &metrics).await?)
    };

    let compiled = CompiledPolicy::compile(&loaded.policy)?;
    let placement = match &enforcement {
        Some(enforcement) => Placement::Local(enforcement.egress.clone()),
        None => Placement::Unconfined,
    };
    let mut audit_settings = loaded.policy.audit.clone();
    options.overrides.apply_audit(&mut audit_settings);
    let audit = AuditLog::open_with_counters(&audit_settings, metrics.audit.clone())?;
    record_start(&audit, &options.policy_path).await;
    let proxy = Proxy::new(
        loaded.policy.clone(),
        compiled,
        placement,
        Recorder::local(audit.clone()),
        metrics.clone(),
    );
    if let Some(events) = enforcement.as_mut().and_then(|e| e.events.take()) {
        tokio::spawn(record_egress_events(
            events,
            metrics.clone(),
            proxy.clone(),
            audit.clone(),
        ));
    }
    let (stop_front, front_stopped) = tokio::sync::watch::channel(false);
    let mut front_task = None;
    let front_certificate = FrontCertificate::new(
        settings
            .tls
            .as_ref()
            .map(tls::load_certified_key)
            .transpose()?,
    );
    if let Some(addr) = settings.listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| DaemonError::Listen { addr, source })?;
        let app = http::router(http::Front {
            proxy: proxy.clone(),
            stopping: front_stopped.clone(),
        });
        let mut stopped = front_stopped.clone();
        let shutdown = async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        };
        let header_timeout = settings.header_read_timeout();
        let linger = settings.answer_poll();
        let failures = metrics.tls_handshake_failures.clone();
        let listener = tls::FrontListener::new(listener, front_certificate.clone(), failures)?;
        front_task = Some(tokio::spawn(serve::serve_until(
            listener,
            app,
            shutdown,
            header_timeout,
            linger,
        )));
    }
    if let Some(enforcement) = &enforcement {
        let listener = control::bind(&settings.control_socket)?;
        tokio::spawn(control::serve(
            listener,
            control::ControlContext {
                egress: enforcement.egress.clone(),
                metrics: metrics.clone(),
                audit: audit.clone(),
                proxy: proxy.clone(),
            },
        ));
    }
    if let Some(addr) = settings.metrics_listen {
        let listener = metrics::bind(addr)
            .await
            .map_err(|source| DaemonError::Metrics { addr, source })?;
        let header_timeout = settings.header_read_timeout();
        tokio::spawn(metrics::serve(listener, metrics.clone(), header_timeout));
    }

    let mut hangup = signal(SignalKind::hangup()).map_err(DaemonError::Signals)?;
    let mut terminate = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;
    let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
    let mut poll = tokio::time::interval(POLL_INTERVAL);
    let mut watched = WatchedFiles::of(&options.policy_path, &loaded.policy);
    let service = &options.service;
    let status = service_status(&loaded.policy, enforcement.is_some(), &settings);
    // Everything is attached, loaded and bound by now: the moment systemd may start what
    // depends on the daemon.
    notify(service.ready(&status));
    let watchdog_every = service.watchdog_interval();
    let mut watchdog = tokio::time::interval(watchdog_every.unwrap_or(Duration::from_secs(3600)));
    tracing::info!(
        policy = %options.policy_path.display(),
        servers = loaded.policy.servers.len(),
        egress = enforcement.is_some(),
        control_socket = %settings.control_socket.display(),
        listen = %display_addr(settings.listen),
        metrics_listen = %display_addr(settings.metrics_listen),
        worker_threads = tokio::runtime::Handle::current().metrics().num_workers(),
        answer_poll_us = settings.answer_poll_us,
        "ready"
    );

    loop {
        let dns_due = dns_refresh_due(enforcement.as_ref());
        let reload_now = tokio::select! {
            _ = hangup.recv() => true,
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            _ = watchdog.tick(), if watchdog_every.is_some() => {
                notify(service.watchdog());
                false
            }
            _ = poll.tick() => {
                if let Some(enforcement) = &enforcement {
                    export_kernel_gauges(&enforcement.egress, &metrics).await;
                }
                end_idle_sessions(&proxy);
                let changed = watched.changed();
                if let Some(changed) = changed {
                    log_file_change(&watched, changed);
                }
                changed.is_some()
            }
            _ = sweep.tick() => {
                proxy.forget_old_spans();
                if let Some(enforcement) = &enforcement
                    && let Err(e) = enforcement.egress.lock().await.sweep_empty_sessions()
                {
                    tracing::warn!(error = %e, "sweeping empty session cgroups");
                }
                false
            }
            _ = tokio::time::sleep_until(dns_due.into()) => {
                if let Some(enforcement) = enforcement.as_mut() {
                    refresh_host_names(enforcement, &metrics).await;
                }
                false
            }
        };
        if reload_now {
            notify(service.reloading());
            let stamped = watched.restamped();
            reload(
                &options.policy_path,
                enforcement.as_mut(),
                &proxy,
                &audit,
                &metrics,
                &front_certificate,
            )
            .await;
            notify(service.ready(&service_status(
                &proxy.model(),
                enforcement.is_some(),
                &settings,
            )));
            watched = stamped.for_policy(&options.policy_path, &proxy.model());
        }
    }
    let grace = Duration::from_secs(settings.shutdown_grace_seconds.into());
    notify(service.stopping(&format!(
        "stopping: finishing calls in flight (up to {}s)",
        grace.as_secs()
    )));
    tracing::info!(
        grace_seconds = grace.as_secs(),
        "stopping; kernel enforcement stays pinned (`mcp-guard egress teardown` removes it)"
    );
    let _ = stop_front.send(true);
    if let Some(mut task) = front_task
        && tokio::time::timeout(grace, &mut task).await.is_err()
    {
        tracing::warn!(
            grace_seconds = grace.as_secs(),
            "calls still in flight after the shutdown grace period are cut off"
        );
        task.abort();
    }
    notify(service.status("stopping: ending sessions"));
    // Server processes stop and each session's end goes on record.
    proxy.end_all_sessions().await;
    if let Err(e) = audit.sync() {
        tracing::error!(error = %e, "audit: flushing the log at shutdown");
    }
    tracing::info!("stopped");
    Ok(())
}

/// A failed notification is worth a warning, never a stop: the daemon enforces either way.
fn notify(sent: Result<(), crate::service::ServiceError>) {
    if let Err(e) = sent {
        tracing::warn!(error = %e, "service manager notification failed");
    }
}

/// The one-line `STATUS=` systemd shows in `systemctl status`.
fn service_status(policy: &Policy, egress: bool, settings: &DaemonSettings) -> String {
    format!(
        "enforcing {} server(s); kernel egress {}; MCP front {}; metrics {}",
        policy.servers.len(),
        if egress { "on" } else { "OFF" },
        display_addr(settings.listen),
        display_addr(settings.metrics_listen),
    )
}

fn load_policy(path: &Path) -> Result<LoadedPolicy, PolicyError> {
    let loaded = Policy::load(path)?;
    for warning in &loaded.warnings {
        tracing::warn!(policy = %path.display(), "{warning}");
    }
    Ok(loaded)
}

async fn start_enforcement(
    policy: &Policy,
    settings: &DaemonSettings,
    metrics: &Arc<Metrics>,
) -> Result<Enforcement, DaemonError> {
    let layout = EgressLayout::new(settings.bpffs.clone(), settings.cgroup_root.clone())?;
    let (mut egress, attachment) = Egress::start(layout)?;
    let layout = egress.layout().clone();
    let (root, pins) = (
        layout.cgroup_root.display().to_string(),
        layout.pins.root.display().to_string(),
    );
    match attachment {
        Attachment::Reused => {
            tracing::info!(cgroup_root = %root, bpffs = %pins, "reusing pinned programs")
        }
        Attachment::Attached => {
            tracing::info!(cgroup_root = %root, bpffs = %pins, "attached egress programs")
        }
        Attachment::Replaced => tracing::info!(
            cgroup_root = %root, bpffs = %pins,
            "replaced pinned programs of an earlier version"
        ),
    }
    let mut resolver = HostResolver::from_system(
        Duration::from_secs(settings.dns_min_ttl_seconds.into()),
        Duration::from_secs(settings.dns_max_ttl_seconds.into()),
    )?;
    let wanted = resolve_and_compile(policy, &mut resolver, metrics).await;
    egress.apply(&wanted)?;

    let (sender, receiver) = mpsc::channel(EVENT_CHANNEL_CAPACITY);
    if let Some(reader) = egress.event_reader() {
        tokio::spawn(async move {
            if let Err(e) = reader.run(sender).await {
                tracing::error!(error = %e, "egress event reader stopped");
            }
        });
    }
    Ok(Enforcement {
        egress: Arc::new(Mutex::new(egress)),
        resolver,
        policy: policy.clone(),
        events: Some(receiver),
    })
}

async fn resolve_and_compile(
    policy: &Policy,
    resolver: &mut HostResolver,
    metrics: &Metrics,
) -> BTreeMap<String, ServerEgress> {
    let outcomes = resolver.track(&from_policy::host_names(policy)).await;
    report_resolutions(&outcomes, metrics);
    from_policy::server_egress(policy, resolver)
}

fn report_resolutions(outcomes: &[(String, Resolution)], metrics: &Metrics) {
    for (host, outcome) in outcomes {
        match outcome {
            Resolution::Resolved { addresses, ttl } => {
                metrics
                    .egress_dns_resolutions
                    .with_label_values(&["resolved"])
                    .inc();
                tracing::debug!(
                    host,
                    addresses,
                    ttl_seconds = ttl.as_secs(),
                    "host resolved"
                );
            }
            Resolution::Failed(error) => {
                metrics
                    .egress_dns_resolutions
                    .with_label_values(&["failed"])
                    .inc();
                tracing::warn!(
                    host,
                    error,
                    "host name in an egress rule did not resolve; its rule allows no new address"
                );
            }
        }
    }
}

/// Applies a changed policy file, or keeps the running one and says why not.
async fn reload(
    path: &Path,
    enforcement: Option<&mut Enforcement>,
    proxy: &Proxy,
    audit: &AuditLog,
    metrics: &Metrics,
    front_certificate: &FrontCertificate,
) {
    match try_reload(path, enforcement, proxy, metrics, front_certificate).await {
        Ok(()) => {
            metrics.policy_reloads.with_label_values(&["applied"]).inc();
            record_policy_event(audit, "load", path, None).await;
            tracing::info!(policy = %path.display(), "policy reloaded");
        }
        Err(e) => {
            metrics.policy_reloads.with_label_values(&["refused"]).inc();
            record_policy_event(audit, "reject", path, Some(&e.to_string())).await;
            tracing::error!(policy = %path.display(), error = %e, "policy reload refused; the previous policy stays in force");
        }
    }
}

async fn try_reload(
    path: &Path,
    enforcement: Option<&mut Enforcement>,
    proxy: &Proxy,
    metrics: &Metrics,
    front_certificate: &FrontCertificate,
) -> Result<(), DaemonError> {
    let loaded = load_policy(path)?;
    let compiled = CompiledPolicy::compile(&loaded.policy)?;
    let renewed = front_certificate_of(&loaded.policy)?;
    if let Some(enforcement) = enforcement {
        let wanted = resolve_and_compile(&loaded.policy, &mut enforcement.resolver, metrics).await;
        enforcement.egress.lock().await.apply(&wanted)?;
        enforcement.policy = loaded.policy.clone();
    }
    proxy.replace_policy(loaded.policy, compiled).await;
    match (front_certificate.is_on(), renewed.is_some()) {
        (false, true) => {
            tracing::info!("daemon.tls was added: new connections to the HTTP front use TLS")
        }
        (true, false) => tracing::warn!(
            "daemon.tls was removed: new connections to the HTTP front are served in the clear"
        ),
        _ => {}
    }
    front_certificate.replace(renewed);
    Ok(())
}

/// The HTTP front's certificate and key as `policy` names them, read now; `None` without
/// `daemon.tls`.
fn front_certificate_of(policy: &Policy) -> Result<Option<rustls::sign::CertifiedKey>, TlsError> {
    policy
        .daemon
        .tls
        .as_ref()
        .map(tls::load_certified_key)
        .transpose()
}

fn dns_refresh_due(enforcement: Option<&Enforcement>) -> std::time::Instant {
    enforcement
        .and_then(|e| e.resolver.next_refresh())
        .unwrap_or_else(|| std::time::Instant::now() + Duration::from_secs(3600))
}

async fn refresh_host_names(enforcement: &mut Enforcement, metrics: &Metrics) {
    let (outcomes, changed) = enforcement.resolver.refresh_due().await;
    report_resolutions(&outcomes, metrics);
    if !changed {
        return;
    }
    tracing::info!("egress host addresses changed; updating allow-lists");
    let wanted = from_policy::server_egress(&enforcement.policy, &enforcement.resolver);
    if let Err(e) = enforcement.egress.lock().await.apply(&wanted) {
        tracing::error!(error = %e, "updating allow-lists after re-resolution");
    }
}

async fn export_kernel_gauges(egress: &Mutex<Egress>, metrics: &Metrics) {
    let status = egress.lock().await.status();
    match status {
        Ok(status) => {
            metrics
                .egress_guarded_cgroups
                .set(status.guarded_cgroups as i64);
            metrics
                .egress_allow_prefixes
                .set(status.allow_prefixes as i64);
            let exported = metrics.egress_events_lost.get();
            if status.lost_events > exported {
                metrics
                    .egress_events_lost
                    .inc_by(status.lost_events - exported);
            }
        }
        Err(e) => tracing::warn!(error = %e, "reading kernel egress state"),
    }
}

/// Each kernel event becomes an audit record (attributed to the calls running when it
/// happened), a structured log line and a metric.
async fn record_egress_events(
    mut events: mpsc::Receiver<EgressAttempt>,
    metrics: Arc<Metrics>,
    proxy: Arc<Proxy>,
    audit: AuditLog,
) {
    let mut batch = Vec::new();
    while events.recv_many(&mut batch, 1024).await > 0 {
        let mut records = Vec::with_capacity(batch.len());
        for attempt in batch.drain(..) {
            let calls = calls_running_at(&proxy, &attempt).await;
            log_egress(&attempt, &calls, &metrics);
            let mode = attempt
                .server
                .as_deref()
                .map_or(Mode::Enforce, |server| proxy.mode_of(server));
            records.push(egress_record(&attempt, &calls, mode));
        }
        // Appended together: committed as one group, with one fsync.
        if let Err(e) = audit.append_all(&records).await {
            tracing::error!(error = %e, "audit: egress records not written");
        }
    }
}

/// The calls of the attempt's session that were running when the kernel saw it.
async fn calls_running_at(proxy: &Proxy, attempt: &EgressAttempt) -> Vec<CallSpan> {
    match attempt.session.as_deref() {
        Some(session) => proxy.calls_at(session, attempt.monotonic_ns).await,
        None => Vec::new(),
    }
}

/// As in the audit record.
fn attribution_label(attribution: Attribution) -> &'static str {
    match attribution {
        Attribution::Exact => "exact",
        Attribution::Ambiguous => "ambiguous",
        Attribution::Idle => "idle",
    }
}

fn attribution_of(calls: &[CallSpan]) -> Attribution {
    match calls.len() {
        0 => Attribution::Idle,
        1 => Attribution::Exact,
        _ => Attribution::Ambiguous,
    }
}

fn egress_record(attempt: &EgressAttempt, calls: &[CallSpan], mode: Mode) -> AuditRecord {
    let mut record = AuditRecord::new(RecordKind::Egress);
    record.server = attempt.server.as_deref().map(str::to_owned);
    record.session = attempt.session.as_deref().map(str::to_owned);
    // The instruction behind the connection, when the calls running then agree on one.
    let mut instructions = calls.iter().filter_map(|c| c.instruction.as_deref());
    if let Some(first) = instructions.next()
        && instructions.all(|other| other == first)
    {
        record.instruction = Some(first.to_owned());
    }
    if let [only] = calls {
        record.call_id = Some(only.call_id.clone());
        record.trace_id = Some(only.trace_id.clone());
    }
    record.addr = Some(attempt.addr);
    record.port = Some(attempt.port);
    record.protocol = match attempt.protocol {
        crate::egress::events::Protocol::Tcp => Some(crate::audit::Protocol::Tcp),
        crate::egress::events::Protocol::Udp => Some(crate::audit::Protocol::Udp),
        crate::egress::events::Protocol::Other => None,
    };
    record.verdict = Some(match attempt.verdict {
        crate::egress::events::Verdict::Allow => crate::audit::Verdict::Allow,
        crate::egress::events::Verdict::Refuse => crate::audit::Verdict::Refuse,
        crate::egress::events::Verdict::WouldRefuse => crate::audit::Verdict::WouldRefuse,
    });
    record.rule = Some(attempt.rule.to_string());
    record.hook = Some(attempt.hook.to_string());
    record.pid = Some(attempt.tgid);
    record.comm = Some(attempt.comm.clone());
    record.cgroup_id = Some(attempt.cgroup_id);
    record.attribution = Some(attribution_of(calls));
    record.call_ids = Some(calls.iter().map(|c| c.call_id.clone()).collect());
    record.mode = mode.lets_everything_through().then_some(mode);
    record.host = attempt.host.as_deref().map(str::to_owned);
    record
}

/// Each attempt as a structured log line and a metric.
fn log_egress(attempt: &EgressAttempt, calls: &[CallSpan], metrics: &Metrics) {
    let server = attempt.server.as_deref().unwrap_or("unknown");
    metrics
        .egress_attempts
        .with_label_values(&[
            server,
            &attempt.verdict.to_string(),
            &attempt.protocol.to_string(),
        ])
        .inc();
    let call_ids: Vec<&str> = calls.iter().map(|c| c.call_id.as_str()).collect();
    let instructions: Vec<&str> = calls
        .iter()
        .filter_map(|c| c.instruction.as_deref())
        .collect();
    tracing::info!(
        target: "mcp_guard::egress",
        server,
        session = attempt.session.as_deref().unwrap_or(""),
        cgroup_id = attempt.cgroup_id,
        guarded_cgroup_id = attempt.guarded_cgroup_id,
        tgid = attempt.tgid,
        tid = attempt.tid,
        comm = %attempt.comm,
        family = %attempt.family,
        protocol = %attempt.protocol,
        addr = %attempt.addr,
        port = attempt.port,
        verdict = %attempt.verdict,
        rule = %attempt.rule,
        host = attempt.host.as_deref().unwrap_or(""),
        hook = %attempt.hook,
        attribution = attribution_label(attribution_of(calls)),
        call_ids = %call_ids.join(","),
        instruction = %instructions.join(","),
        at_unix_ms = attempt.at.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
        "egress"
    );
}

async fn record_policy_event(audit: &AuditLog, event: &str, path: &Path, reason: Option<&str>) {
    let mut record = policy_record(event, path);
    record.reason = reason.map(str::to_owned);
    append_policy_record(audit, record).await;
}

/// The start-up policy record; it also says when opening the log cut off what a crash left
/// half-written, so the chain itself shows where a recovery happened.
async fn record_start(audit: &AuditLog, path: &Path) {
    let mut record = policy_record("load", path);
    let cut = audit.torn_bytes_cut();
    if cut > 0
        && let Some(detail) = record.detail.as_mut()
    {
        detail.insert("audit_torn_bytes_cut".into(), cut.into());
    }
    append_policy_record(audit, record).await;
}

fn policy_record(event: &str, path: &Path) -> AuditRecord {
    let mut record = AuditRecord::event(RecordKind::Policy, event);
    if let Some(detail) = record.detail.as_mut() {
        detail.insert(
            "path".into(),
            serde_json::Value::String(path.display().to_string()),
        );
    }
    record
}

async fn append_policy_record(audit: &AuditLog, record: AuditRecord) {
    if let Err(e) = audit.append(record).await {
        tracing::error!(error = %e, "audit: policy record not written");
    }
}

/// Says which watched file changed, before the reload it leads to.
fn log_file_change(watched: &WatchedFiles, changed: &Path) {
    if watched.is_policy_file(changed) {
        tracing::info!("policy file changed");
    } else {
        tracing::info!(path = %changed.display(), "key file changed");
    }
}

fn display_addr(addr: Option<SocketAddr>) -> String {
    addr.map(|a| a.to_string()).unwrap_or_else(|| "off".into())
}

/// Ends the sessions idle for longer than the policy in force allows, off the signal loop
/// (stopping server processes takes a moment).
fn end_idle_sessions(proxy: &Arc<Proxy>) {
    let seconds = proxy.model().daemon.session_idle_timeout_seconds;
    if seconds == 0 {
        return;
    }
    let proxy = Arc::clone(proxy);
    tokio::spawn(async move {
        proxy.end_idle_sessions(Duration::from_secs(seconds)).await;
    });
}
