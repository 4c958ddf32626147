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
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use mcp_guard::policy::CompiledPolicy;
use mcp_guard_tests::bench::{parse_number, percentile};
use mcp_guard_tests::policy_mix::{DecisionPath, compiled, decision_paths};
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

/// A decision path with what was measured of it.
struct TimedPath {
    path: DecisionPath,
    samples: Vec<u64>,
    allocations_per_decision: f64,
}

/// One policy size, compiled, with its decision paths and their samples.
struct Configuration {
    rules: usize,
    compile_ms: f64,
    policy: CompiledPolicy,
    paths: Vec<TimedPath>,
}

impl Configuration {
    fn build(rules: usize) -> Result<Self, String> {
        let started = Instant::now();
        let policy = compiled(rules)?;
        let paths = decision_paths(rules).into_iter().map(|path| TimedPath {
            path,
            samples: Vec::new(),
            allocations_per_decision: 0.0,
        });
        Ok(Configuration {
            rules,
            compile_ms: started.elapsed().as_secs_f64() * 1e3,
            policy,
            paths: paths.collect(),
        })
    }

    /// Refuses to time a path whose decisions do not come out as the path claims.
    fn check_paths(&self) -> Result<(), String> {
        for timed in &self.paths {
            timed
                .path
                .check(&self.policy)
                .map_err(|error| format!("{} rules, {error}", self.rules))?;
        }
        Ok(())
    }

    fn count_allocations(&mut self) {
        const DECISIONS: usize = 10_000;
        for path in &mut self.paths {
            let requests = path.path.requests();
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
            let requests = path.path.requests();
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
                path: path.path.label,
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
