//! Taking a `std::sync::Mutex`. A lock is poisoned when a thread panicked while holding it: a bug. The
//! agent's locks guard plain state that each critical section changes with whole assignments, so the
//! state is still whole; dropping it quietly (a status that stops changing, a peer table that stops
//! filling, root following that stops) would hide the bug and break the agent for good. So the
//! poisoning is reported, with the lock's name, and the lock taken over.

use std::sync::{Mutex, MutexGuard};

/// Locks `m` (named `what` in the report if it was poisoned).
pub fn lock<'a, T>(m: &'a Mutex<T>, what: &'static str) -> MutexGuard<'a, T> {
    m.lock().unwrap_or_else(|poisoned| {
        tracing::error!(
            lock = what,
            "a lock was poisoned by a panic while it was held; its state is taken over"
        );
        m.clear_poison();
        poisoned.into_inner()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_lock_is_taken_over_with_its_state() {
        let m = std::sync::Arc::new(Mutex::new(7));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let _g = m2.lock();
            panic!("poison it");
        })
        .join();
        assert!(m.is_poisoned());
        assert_eq!(*lock(&m, "test"), 7);
        assert!(!m.is_poisoned(), "reported once, then cleared");
    }
}
