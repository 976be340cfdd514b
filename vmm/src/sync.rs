//! Locking shared by every thread of the VMM.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, going on with its state if another thread panicked while
/// holding it: a device or the run state must stay usable for the rest of
/// the VM, and a panic is already logged where it happened.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
