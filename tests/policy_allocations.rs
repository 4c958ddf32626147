//! Deciding allocates nothing (issue 3: the policy is "compiled once into a structure that
//! evaluates without allocating on the hot path"), asserted here rather than only reported by
//! `cargo xtask bench policy`. This binary's allocator counts the allocations of each thread,
//! so tests running beside one another do not see each other's.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::hint::black_box;

use mcp_guard_tests::policy_mix::{compiled, decision_paths};

thread_local! {
    // `const` and without a destructor: reading it never allocates, even as a thread ends.
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

struct CountingAllocator;

fn count_one() {
    let _ = ALLOCATIONS.try_with(|count| count.set(count.get() + 1));
}

// SAFETY: defers to the system allocator; only counts calls.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_one();
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_one();
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

/// Allocations this thread made while doing `work`.
fn allocations_of(work: impl FnOnce()) -> u64 {
    let before = ALLOCATIONS.with(Cell::get);
    work();
    ALLOCATIONS.with(Cell::get) - before
}

#[test]
fn the_counter_sees_an_allocation() {
    let made = allocations_of(|| drop(black_box(vec![1u8; 64])));
    assert_eq!(made, 1);
}

/// Every way a decision can go, at 10, 1,000 and 10,000 rules: allowed by an exact name, a
/// pattern, an `arguments` schema, a resource rule, a `when` condition; denied by a rule, by
/// an unmet condition and by default.
#[test]
fn deciding_allocates_nothing_on_any_path_at_any_size() {
    for rules in [10, 1_000, 10_000] {
        let policy = compiled(rules).unwrap();
        for path in decision_paths(rules) {
            // Also the first decision of each operation, so nothing made once is counted.
            path.check(&policy)
                .unwrap_or_else(|error| panic!("{rules} rules, {error}"));
            let requests = path.requests();
            let made = allocations_of(|| {
                for request in requests.iter().cycle().take(1_000) {
                    black_box(policy.decide(black_box(request)));
                }
            });
            assert_eq!(
                made, 0,
                "{rules} rules, {}: {made} allocations in 1,000 decisions",
                path.label
            );
        }
    }
}
