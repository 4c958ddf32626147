//! `cargo xtask bench policy`: how long the compiled policy takes to decide one MCP operation,
//! with 10, 1,000 and 10,000 rules, and whether deciding allocates.
//!
//! Each policy puts all its rules in one server, the worst case for the per-server index, in
//! a mix modelled on a real deployment: mostly allow rules for exact tool names by role, some
//! by principal, prefix patterns (`svc12_read_*`), suffix-pattern and exact deny rules,
//! method rules (`tools/list`, `resources/*`), resource URI patterns, `when` conditions, and
//! one rule in twenty with an `arguments` JSON Schema.
//!
//! Decision paths timed: allowed by an exact tool name, allowed by a pattern, allowed after
//! validating arguments against a schema, denied by a deny rule, and denied by default (no
//! rule matches, so every index is probed and misses). Each sample times one `decide` call;
//! the configurations are interleaved in rounds so that drift and noise hit all alike, and
//! the requests of each path rotate over many tools so no single hash bucket stays hot.
//! Reported: p50, p99 and mean per configuration and path, the cost of reading the clock
//! (included in every sample), compile time, and heap allocations per decision (counted by
//! this binary's allocator in a separate, untimed pass).
//!
//! Flags: `--decisions N` per configuration and path (200000), `--rounds N` (20), `--json`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use mcp_guard::policy::{CompiledPolicy, DecisionRequest, Effect, Policy};
use mcp_guard_tests::bench::{parse_number, percentile};
use serde_json::{Value, json};

/// Counts allocations so the bench can show the decision path makes none.
struct CountingAllocator;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: defers to the system allocator; only counts calls.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

const RULE_COUNTS: [usize; 3] = [10, 1_000, 10_000];
const SERVER: &str = "crm";
const TEAMS: usize = 10;
const PRINCIPALS: usize = 50;
/// The target for one decision at 10,000 rules.
const TARGET_NS: u64 = 5_000;

struct Options {
    decisions: usize,
    rounds: usize,
    json: bool,
}

fn parse_options() -> Result<Options, String> {
    let mut options = Options {
        decisions: 200_000,
        rounds: 20,
        json: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--decisions" => options.decisions = parse_number(&value()?)?,
            "--rounds" => options.rounds = parse_number(&value()?)?,
            "--json" => options.json = true,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if options.rounds == 0 || options.decisions < options.rounds {
        return Err("--decisions must be at least --rounds, and --rounds at least 1".into());
    }
    Ok(options)
}

fn main() {
    if let Err(error) = run() {
        eprintln!("policy-bench: {error}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let options = parse_options()?;
    let mut configurations = RULE_COUNTS
        .iter()
        .map(|&rules| Configuration::build(rules))
        .collect::<Result<Vec<_>, _>>()?;
    for configuration in &mut configurations {
        configuration.check_paths()?;
        configuration.count_allocations();
    }
    let timer_overhead = measure_timer_overhead(options.decisions);
    let per_round = options.decisions / options.rounds;
    for _ in 0..options.rounds {
        for configuration in &mut configurations {
            configuration.time_round(per_round);
        }
    }
    report(&mut configurations, timer_overhead, &options);
    Ok(())
}

/// The principal `agent-{k}` holds role `team-{k % TEAMS}`.
fn principal_for_team(team: usize) -> String {
    format!("agent-{team}")
}

/// Rule `i` of the generated policy, by its position in a cycle of twenty.
fn rule(i: usize) -> Value {
    let team = format!("team-{}", i % TEAMS);
    let service = i % 37;
    let (id, description) = (format!("r{i}"), format!("generated rule {i}"));
    let mut rule = match i % 20 {
        0 => {
            json!({ "effect": "deny", "roles": [team], "tools": [format!("svc{service}_danger_{i}")] })
        }
        1 => json!({ "effect": "deny", "tools": [format!("*_admin_{i}")] }),
        2 | 3 => json!({ "effect": "allow", "roles": [team], "tools": [format!("svc{i}_read_*")] }),
        4 => json!({
            "effect": "allow",
            "roles": [team],
            "tools": [format!("svc{service}_write_{i}")],
            "arguments": {
                "type": "object",
                "properties": {
                    "path": { "type": "string", "pattern": "^/srv/", "maxLength": 256 },
                    "mode": { "enum": ["append", "replace"] }
                },
                "required": ["path"]
            }
        }),
        5 => {
            json!({ "effect": "allow", "roles": [team], "methods": ["tools/list", "resources/*"] })
        }
        6 => {
            json!({ "effect": "allow", "roles": [team], "resources": [format!("file:///srv/{i}/*")] })
        }
        7 => json!({
            "effect": "allow",
            "roles": [team],
            "tools": [format!("svc{service}_deploy_{i}")],
            "when": { "step": ["release", "hotfix"] }
        }),
        8 => json!({
            "effect": "allow",
            "principals": [format!("agent-{}", i % PRINCIPALS)],
            "tools": [format!("svc{service}_op_{i}")]
        }),
        _ => {
            json!({ "effect": "allow", "roles": [team], "tools": [format!("svc{service}_op_{i}")] })
        }
    };
    let object = rule.as_object_mut().expect("a rule is an object");
    object.insert("id".into(), id.into());
    object.insert("description".into(), description.into());
    rule
}

fn policy_json(rule_count: usize) -> Value {
    let principals: serde_json::Map<String, Value> = (0..PRINCIPALS)
        .map(|k| {
            let roles = json!({ "roles": [format!("team-{}", k % TEAMS)] });
            (format!("agent-{k}"), roles)
        })
        .collect();
    json!({
        "version": 1,
        "principals": principals,
        "servers": {
            SERVER: {
                "url": "http://127.0.0.1:9/mcp",
                "rules": (0..rule_count).map(rule).collect::<Vec<_>>()
            }
        }
    })
}

/// One operation to decide, owning what a [`DecisionRequest`] borrows.
struct Operation {
    principal: String,
    roles: Vec<String>,
    name: String,
    arguments: Option<Value>,
}

impl Operation {
    fn for_team(team: usize, name: String, arguments: Option<Value>) -> Self {
        let principal = principal_for_team(team);
        Operation {
            roles: vec![format!("team-{team}")],
            principal,
            name,
            arguments,
        }
    }

    fn request(&self) -> DecisionRequest<'_> {
        let request = DecisionRequest::new(SERVER, &self.principal, &self.roles, "tools/call")
            .with_name(&self.name);
        match &self.arguments {
            Some(arguments) => request.with_arguments(arguments),
            None => request,
        }
    }
}

/// A way a decision can go, with the operations that go that way.
struct DecisionPath {
    label: &'static str,
    expected: Effect,
    operations: Vec<Operation>,
    samples: Vec<u64>,
    allocations_per_decision: f64,
}

/// Up to this many operations per path, rotated through while timing.
const OPERATIONS_PER_PATH: usize = 64;

fn decision_paths(rule_count: usize) -> Vec<DecisionPath> {
    let rules_where = |kind: &[usize]| {
        (0..rule_count)
            .filter(|i| kind.contains(&(i % 20)))
            .take(OPERATIONS_PER_PATH)
            .collect::<Vec<_>>()
    };
    let path = |label, expected, operations| DecisionPath {
        label,
        expected,
        operations,
        samples: Vec::new(),
        allocations_per_decision: 0.0,
    };
    let arguments = json!({ "path": "/srv/reports/q3.csv", "mode": "append" });
    vec![
        path(
            "allow: exact tool",
            Effect::Allow,
            rules_where(&[9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19])
                .into_iter()
                .map(|i| Operation::for_team(i % TEAMS, format!("svc{}_op_{i}", i % 37), None))
                .collect(),
        ),
        path(
            "allow: tool pattern",
            Effect::Allow,
            rules_where(&[2, 3])
                .into_iter()
                .map(|i| Operation::for_team(i % TEAMS, format!("svc{i}_read_accounts"), None))
                .collect(),
        ),
        path(
            "allow: arguments schema",
            Effect::Allow,
            rules_where(&[4])
                .into_iter()
                .map(|i| {
                    let name = format!("svc{}_write_{i}", i % 37);
                    Operation::for_team(i % TEAMS, name, Some(arguments.clone()))
                })
                .collect(),
        ),
        path(
            "deny: deny rule",
            Effect::Deny,
            rules_where(&[0])
                .into_iter()
                .map(|i| Operation::for_team(i % TEAMS, format!("svc{}_danger_{i}", i % 37), None))
                .collect(),
        ),
        path(
            "deny: no rule (default)",
            Effect::Deny,
            (0..OPERATIONS_PER_PATH)
                .map(|k| Operation::for_team(k % TEAMS, format!("svc{}_unknown_{k}", k % 37), None))
                .collect(),
        ),
    ]
}

/// One policy size, compiled, with its decision paths and their samples.
struct Configuration {
    rules: usize,
    compile_ms: f64,
    policy: CompiledPolicy,
    paths: Vec<DecisionPath>,
}

impl Configuration {
    fn build(rules: usize) -> Result<Self, String> {
        let text = policy_json(rules).to_string();
        let started = Instant::now();
        let loaded =
            Policy::from_json_str(&text, Path::new("<bench>")).map_err(|e| e.to_string())?;
        let policy = CompiledPolicy::compile(&loaded.policy).map_err(|e| e.to_string())?;
        Ok(Configuration {
            rules,
            compile_ms: started.elapsed().as_secs_f64() * 1e3,
            policy,
            paths: decision_paths(rules),
        })
    }

    /// Refuses to time a path whose decisions do not come out as the path claims.
    fn check_paths(&self) -> Result<(), String> {
        for path in &self.paths {
            for operation in &path.operations {
                let decision = self.policy.decide(&operation.request());
                if decision.effect != path.expected {
                    return Err(format!(
                        "{} rules, {}: {} was decided {:?}: {}",
                        self.rules, path.label, operation.name, decision.effect, decision.reason
                    ));
                }
            }
        }
        Ok(())
    }

    fn count_allocations(&mut self) {
        const DECISIONS: usize = 10_000;
        for path in &mut self.paths {
            let requests: Vec<_> = path.operations.iter().map(Operation::request).collect();
            let before = ALLOCATIONS.load(Ordering::Relaxed);
            for request in requests.iter().cycle().take(DECISIONS) {
                black_box(self.policy.decide(black_box(request)));
            }
            let made = ALLOCATIONS.load(Ordering::Relaxed) - before;
            path.allocations_per_decision = made as f64 / DECISIONS as f64;
        }
    }

    fn time_round(&mut self, decisions: usize) {
        for path in &mut self.paths {
            let requests: Vec<_> = path.operations.iter().map(Operation::request).collect();
            path.samples.reserve(decisions);
            for request in requests.iter().cycle().take(decisions) {
                let started = Instant::now();
                let decision = self.policy.decide(black_box(request));
                let elapsed = started.elapsed();
                black_box(decision);
                path.samples.push(elapsed.as_nanos() as u64);
            }
        }
    }
}

/// What reading the clock twice costs; every sample includes it.
fn measure_timer_overhead(samples: usize) -> u64 {
    let mut elapsed: Vec<u64> = (0..samples)
        .map(|_| {
            let started = Instant::now();
            black_box(started.elapsed().as_nanos() as u64)
        })
        .collect();
    elapsed.sort_unstable();
    percentile(&elapsed, 50)
}

struct Row<'c> {
    rules: usize,
    path: &'c str,
    samples: usize,
    p50: u64,
    p99: u64,
    mean: f64,
    allocations: f64,
}

fn rows(configurations: &mut [Configuration]) -> Vec<Row<'_>> {
    let mut rows = Vec::new();
    for configuration in configurations.iter_mut() {
        for path in &mut configuration.paths {
            path.samples.sort_unstable();
            let total: u64 = path.samples.iter().sum();
            rows.push(Row {
                rules: configuration.rules,
                path: path.label,
                samples: path.samples.len(),
                p50: percentile(&path.samples, 50),
                p99: percentile(&path.samples, 99),
                mean: total as f64 / path.samples.len() as f64,
                allocations: path.allocations_per_decision,
            });
        }
    }
    rows
}

fn report(configurations: &mut [Configuration], timer_overhead: u64, options: &Options) {
    let compile_ms: Vec<(usize, f64)> = configurations
        .iter()
        .map(|c| (c.rules, c.compile_ms))
        .collect();
    let rows = rows(configurations);
    let worst_p99_at_max = rows
        .iter()
        .filter(|row| row.rules == RULE_COUNTS[RULE_COUNTS.len() - 1])
        .map(|row| row.p99)
        .max()
        .unwrap_or(0);
    let meets_target = worst_p99_at_max < TARGET_NS;
    if options.json {
        let decisions: Vec<Value> = rows
            .iter()
            .map(|row| {
                json!({
                    "rules": row.rules, "path": row.path, "samples": row.samples,
                    "p50_ns": row.p50, "p99_ns": row.p99, "mean_ns": row.mean,
                    "allocations_per_decision": row.allocations,
                })
            })
            .collect();
        let compile: Vec<Value> = compile_ms
            .iter()
            .map(|(rules, ms)| json!({ "rules": rules, "load_and_compile_ms": ms }))
            .collect();
        println!(
            "{}",
            json!({
                "decisions": decisions,
                "compile": compile,
                "timer_overhead_ns": timer_overhead,
                "target_ns": TARGET_NS,
                "worst_p99_ns_at_10000_rules": worst_p99_at_max,
                "meets_target": meets_target,
            })
        );
        return;
    }
    println!(
        "policy decision time: {} decisions per configuration and path, in {} interleaved rounds \
         (each sample includes ~{timer_overhead} ns of clock reading)",
        options.decisions / options.rounds * options.rounds,
        options.rounds
    );
    println!(
        "{:>6}  {:<24} {:>8} {:>8} {:>9} {:>14}",
        "rules", "path", "p50 ns", "p99 ns", "mean ns", "allocs/decide"
    );
    for row in &rows {
        println!(
            "{:>6}  {:<24} {:>8} {:>8} {:>9.0} {:>14.2}",
            row.rules, row.path, row.p50, row.p99, row.mean, row.allocations
        );
    }
    println!();
    for (rules, ms) in compile_ms {
        println!("{rules:>6} rules: parsed, validated and compiled in {ms:.1} ms");
    }
    println!(
        "target: every path under {TARGET_NS} ns at 10,000 rules (worst p99 {worst_p99_at_max} ns): {}",
        if meets_target { "met" } else { "NOT met" }
    );
}
