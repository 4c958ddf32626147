//! One opening at a time per session id: concurrent first requests of a stateless
//! (2026-07-28) session name the same id, and must find one session, not start one each
//! (which would share a cgroup path, and orphan all but the last in the session map).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedMutexGuard;

type Gate = Arc<tokio::sync::Mutex<()>>;

#[derive(Default)]
pub struct OpeningGates {
    gates: Arc<Mutex<HashMap<String, Gate>>>,
}

/// Held while a session id is looked up and, if absent, opened; others with the same id wait.
pub struct OpeningPass {
    id: String,
    gate: Gate,
    gates: Arc<Mutex<HashMap<String, Gate>>>,
    held: Option<OwnedMutexGuard<()>>,
}

impl OpeningGates {
    pub async fn enter(&self, id: &str) -> OpeningPass {
        let gate = self.lock().entry(id.to_owned()).or_default().clone();
        let held = gate.clone().lock_owned().await;
        OpeningPass {
            id: id.to_owned(),
            gate,
            gates: self.gates.clone(),
            held: Some(held),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Gate>> {
        lock_gates(&self.gates)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

fn lock_gates(
    gates: &Mutex<HashMap<String, Gate>>,
) -> std::sync::MutexGuard<'_, HashMap<String, Gate>> {
    gates
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Drop for OpeningPass {
    fn drop(&mut self) {
        // Let go first: the guard holds a reference to the gate too.
        drop(self.held.take());
        let mut gates = lock_gates(&self.gates);
        // The map's reference and ours: nobody else waits at this gate, so it can go.
        if Arc::strong_count(&self.gate) == 2 {
            gates.remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_id_is_opened_by_one_at_a_time_and_others_go_on() {
        let gates = Arc::new(OpeningGates::default());
        let inside = Arc::new(AtomicUsize::new(0));
        let most_inside = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let (gates, inside, most_inside) = (gates.clone(), inside.clone(), most_inside.clone());
            tasks.push(tokio::spawn(async move {
                let _pass = gates.enter("stateless-a").await;
                let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                most_inside.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
                inside.fetch_sub(1, Ordering::SeqCst);
            }));
        }
        // Another id does not wait for them.
        let other = tokio::time::timeout(Duration::from_secs(5), gates.enter("stateless-b")).await;
        assert!(other.is_ok(), "another id waited");
        drop(other);
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(most_inside.load(Ordering::SeqCst), 1);
        assert_eq!(gates.len(), 0, "gates nobody waits at are removed");
    }
}
