//! The one loop that takes descriptor chains off a virtqueue: every device
//! (block, rng, console transmit and receive) serves its queues through
//! [`drain`], with a handler that says what it did with each chain.
//!
//! The loop owns what all devices must get right the same way:
//! * notification suppression: notifications are disabled while chains are
//!   taken and enabled again only when the ring looks empty, and then the
//!   ring is read once more, so that a chain the driver published in
//!   between is never missed;
//! * completion: each chain the handler finished goes to the used ring with
//!   the length it reports, and a malformed chain is logged (rate-limited)
//!   and completed empty, so the driver gets every buffer back;
//! * the interrupt: raised once per drain, after the last chain, and only
//!   when the driver asked for it (EVENT_IDX), except after a unit of
//!   several chains (below), which always signals;
//! * a broken ring: any error from the ring itself (an available index or a
//!   head the queue cannot hold, rings outside guest memory) is the
//!   driver's fault and cannot be skipped over, so the device is marked
//!   broken, asks for a reset (DEVICE_NEEDS_RESET) and takes nothing more
//!   until the driver resets it: no panic and no spinning on a bad index;
//! * a budget: at most a given number of chains per drain, so that one busy
//!   queue cannot starve the other devices on the event loop;
//! * units of several chains (virtio-net's mergeable receive buffers: one
//!   frame over as many chains as it needs): the chains of a unit reach the
//!   used ring together, behind one used-index update, so the driver never
//!   sees a unit in part; a unit the ring runs out for goes back to the
//!   queue whole. A unit never spans two drains.
//!
//! What stays with the device is what differs: how a chain is read or
//! written, and when to stop early because the backend cannot take or give
//! more (the console's flow control), in which case the chain is left at the
//! head of the queue for the next drain.

use log::warn;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::Activated;

/// A chain the device cannot serve, through the driver's fault; it is
/// logged and completed with nothing written.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// A descriptor lies outside guest memory, or the chain is malformed
    /// (a loop, a bad indirect table, too long).
    #[error("is malformed ({0})")]
    Malformed(virtio_queue::Error),
    /// A transmit-like chain without a byte the device may read.
    #[error("has no device-readable buffer")]
    NoReadable,
    /// A receive-like chain without a byte the device may write.
    #[error("has no device-writable buffer")]
    NoWritable,
    /// A chain taken in pieces cannot be resumed where it was left (the
    /// driver changed it in the meantime).
    #[error("cannot be resumed ({0})")]
    Resume(virtio_queue::Error),
    /// The guest memory behind the chain could not be read.
    #[error("cannot be read ({0})")]
    Read(std::io::Error),
    /// The chain breaks a rule of the device (a header missing, a buffer
    /// in the wrong direction, a length out of bounds).
    #[error("is invalid ({0})")]
    Invalid(&'static str),
}

/// What a handler did with one chain.
#[derive(Debug)]
pub enum Handled {
    /// Done: the chain goes to the used ring with this many bytes written
    /// to the guest, and draining goes on.
    Used(u32),
    /// Done, as [`Handled::Used`], but draining ends here: the backend has
    /// nothing more to give or take for now.
    UsedAndStop(u32),
    /// Not done: the chain stays at the head of the queue, to be offered
    /// again on the next drain, and draining ends here. The handler keeps
    /// whatever it needs to resume the chain.
    Stop,
    /// The chain is the driver's mistake: it is logged and completed with
    /// length 0, and draining goes on. Chains held as parts of the unit in
    /// progress ([`Handled::Part`]) are completed with length 0 as well:
    /// the unit is abandoned.
    Malformed(ChainError),
    /// The chain holds part of a unit that goes on in the next chain, with
    /// this many bytes written to the guest: it is held, and completed with
    /// the chain that ends the unit ([`Handled::Used`] or
    /// [`Handled::UsedAndStop`]). If the handler stops, or the ring runs out
    /// before the unit ends, the held chains go back to the queue with the
    /// current one, and the handler starts the unit over on the next drain.
    Part(u32),
}

/// Why a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// The available ring is empty and notifications are enabled: the
    /// driver's next notification means new chains.
    Empty,
    /// The handler stopped ([`Handled::Stop`] or [`Handled::UsedAndStop`]).
    /// Chains may be left and notifications stay disabled: the device
    /// resumes on its own event (room on the backend, input).
    Stopped,
    /// The budget was spent with chains possibly left; notifications stay
    /// disabled, so the caller must come back on its own (re-arm its queue
    /// event).
    Budget,
    /// The device is broken (now or before): nothing was or will be taken
    /// until the driver resets it.
    Broken,
    /// The ring ran out in the middle of a unit ([`Handled::Part`]), whose
    /// chains went back to the queue, and the driver has published more
    /// since: drain again (the unit starts over).
    Retry,
}

/// Takes chains off queue `index` of `active` and hands each to `handle`
/// with guest memory, until the ring is empty, the handler stops, or
/// `budget` chains (when given) were handled; completes them as the handler
/// says, then signals the driver if it wants to hear about it. See the
/// module documentation for the rules. Returns why it ended.
pub fn drain<F>(active: &mut Activated, index: usize, budget: Option<usize>, handle: F) -> Drained
where
    F: FnMut(&GuestMemoryMmap, DescriptorChain<&GuestMemoryMmap>) -> Handled,
{
    if active.broken {
        return Drained::Broken;
    }
    let (done, result) = take_chains(active, index, budget, handle);
    if done.chains > 0 {
        let queue = &mut active.queues[index];
        match queue.needs_notification(&active.mem) {
            Ok(wanted) => {
                if wanted || done.force_signal {
                    active.interrupt.signal_used();
                }
            }
            Err(e) => {
                warn!(
                    "{}: cannot read the used event index of queue {index}: {e}; signalling anyway",
                    active.name
                );
                active.interrupt.signal_used();
            }
        }
    }
    match result {
        Ok(drained) => drained,
        Err(why) => {
            active.set_broken(format_args!("queue {index}: {why}"));
            Drained::Broken
        }
    }
}

/// The loop of [`drain`]: returns how many chains went to the used ring,
/// whether the driver must be signalled whatever its event index says (a
/// unit of several chains was published at once), and why it ended or what
/// broke the queue.
fn take_chains<F>(
    active: &mut Activated,
    index: usize,
    budget: Option<usize>,
    mut handle: F,
) -> (Completed, Result<Drained, String>)
where
    F: FnMut(&GuestMemoryMmap, DescriptorChain<&GuestMemoryMmap>) -> Handled,
{
    let mem = &active.mem;
    let name = &active.name;
    let malformed = &mut active.malformed;
    let mut done = Completed::default();
    let Some(queue) = active.queues.get_mut(index) else {
        return (done, Err(format!("the device has no queue {index}")));
    };
    // The chains of the unit in progress: (head, bytes written).
    let mut held: Vec<(u16, u32)> = Vec::new();
    loop {
        if let Err(e) = queue.disable_notification(mem) {
            return (done, Err(format!("cannot disable notifications: {e}")));
        }
        loop {
            if held.is_empty() && budget.is_some_and(|b| done.chains >= b) {
                return (done, Ok(Drained::Budget));
            }
            let chain = match queue.iter(mem) {
                Ok(mut avail) => avail.next(),
                Err(e) => return (done, Err(format!("invalid available ring: {e}"))),
            };
            let Some(chain) = chain else {
                break;
            };
            let head = chain.head_index();
            let (len, stop) = match handle(mem, chain) {
                Handled::Part(len) => {
                    held.push((head, len));
                    continue;
                }
                Handled::Used(len) => (len, false),
                Handled::UsedAndStop(len) => (len, true),
                Handled::Stop => {
                    for _ in 0..=held.len() {
                        queue.go_to_previous_position();
                    }
                    return (done, Ok(Drained::Stopped));
                }
                Handled::Malformed(e) => {
                    *malformed += 1;
                    // A guest can post bad chains in a loop: the first ten
                    // are logged, then every power of two.
                    if *malformed <= 10 || malformed.is_power_of_two() {
                        warn!(
                            "{name}: descriptor chain {head} of queue {index} {e}; completed empty \
                             ({malformed} malformed so far)"
                        );
                    }
                    for part in &mut held {
                        part.1 = 0;
                    }
                    (0, false)
                }
            };
            held.push((head, len));
            if let Err(e) = complete(queue, mem, &held) {
                return (done, Err(e));
            }
            done.chains += held.len();
            done.force_signal |= held.len() > 1;
            held.clear();
            if stop {
                return (done, Ok(Drained::Stopped));
            }
        }
        if !held.is_empty() {
            // The ring ran out in the middle of a unit: it goes back whole.
            // Notifications are enabled first, for chains beyond the unit's
            // (with EVENT_IDX: the driver notifies once it publishes one).
            let more = queue.enable_notification(mem);
            for _ in 0..held.len() {
                queue.go_to_previous_position();
            }
            return match more {
                Ok(true) => (done, Ok(Drained::Retry)),
                Ok(false) => (done, Ok(Drained::Empty)),
                Err(e) => (done, Err(format!("cannot enable notifications: {e}"))),
            };
        }
        match queue.enable_notification(mem) {
            Ok(true) => continue,
            Ok(false) => return (done, Ok(Drained::Empty)),
            Err(e) => return (done, Err(format!("cannot enable notifications: {e}"))),
        }
    }
}

/// What a drain put in the used ring.
#[derive(Default)]
struct Completed {
    /// Chains completed.
    chains: usize,
    /// A unit of several chains was completed: its used-ring entries were
    /// written behind one index update, which the queue's event-index
    /// bookkeeping counts as one, so the driver is signalled regardless.
    force_signal: bool,
}

/// Puts `chains` (head, length) in the used ring, in order, behind a single
/// used-index update: all but the last are written into their slots first,
/// the last goes through the queue's own `add_used`, which publishes the
/// index (with release ordering) for all of them.
fn complete(queue: &mut Queue, mem: &GuestMemoryMmap, chains: &[(u16, u32)]) -> Result<(), String> {
    let Some((&(last_head, last_len), first)) = chains.split_last() else {
        return Ok(());
    };
    let size = queue.size();
    let start = queue.next_used();
    for (i, &(head, len)) in first.iter().enumerate() {
        if head >= size {
            return Err(format!(
                "cannot complete descriptor chain {head}: beyond the queue"
            ));
        }
        // i < chains.len() <= the queue size, which fits in u16.
        let slot = u64::from(start.wrapping_add(i as u16) % size);
        let addr = queue
            .used_ring()
            .checked_add(USED_RING_HEADER + slot * USED_ELEMENT)
            .map(GuestAddress)
            .ok_or_else(|| format!("cannot complete descriptor chain {head}: address overflow"))?;
        // An element is the chain's head index, then its length, both le32.
        let mut elem = [0u8; USED_ELEMENT as usize];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        mem.write_slice(&elem, addr)
            .map_err(|e| format!("cannot complete descriptor chain {head}: {e}"))?;
    }
    queue.set_next_used(start.wrapping_add(first.len() as u16));
    queue
        .add_used(mem, last_head, last_len)
        .map_err(|e| format!("cannot complete descriptor chain {last_head}: {e}"))
}

/// Bytes before the first element of the used ring (flags, index).
const USED_RING_HEADER: u64 = 4;
/// Bytes per used-ring element (id, length).
const USED_ELEMENT: u64 = 8;

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use super::*;
    use crate::virtio::test_utils::{mem, TestQueue, R, W};
    use crate::virtio::{ActivateContext, DeviceState, Interrupt};

    fn activated(q: &TestQueue, mem: &GuestMemoryMmap) -> Activated {
        let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        let mut state = DeviceState::Inactive;
        let ctx = ActivateContext {
            mem: mem.clone(),
            queues: vec![q.queue()],
            acked_features: 0,
        };
        state.activate(ctx, &interrupt, "test", 1).unwrap();
        match state {
            DeviceState::Activated(a) => a,
            DeviceState::Inactive => unreachable!(),
        }
    }

    #[test]
    fn every_chain_is_used_with_the_length_the_handler_gives() {
        let m = mem();
        let mut q = TestQueue::new(&m, 0, 16);
        let mut a = activated(&q, &m);
        for i in 0..3u64 {
            q.add_chain(&[(0x10_000 + i * 0x1000, 16, W)]);
        }
        let mut lens = [5u32, 0, 16].into_iter();
        let drained = drain(&mut a, 0, None, |_, _| Handled::Used(lens.next().unwrap()));
        assert_eq!(drained, Drained::Empty);
        assert_eq!(q.used(), vec![(0, 5), (1, 0), (2, 16)]);
        assert_eq!(a.interrupt.eventfd().read().unwrap(), 1, "one interrupt");
    }

    #[test]
    fn a_chain_published_during_the_drain_is_taken_too() {
        let m = mem();
        let mut q = TestQueue::new(&m, 0, 16);
        let mut a = activated(&q, &m);
        q.add_chain(&[(0x10_000, 16, W)]);
        let q2 = &mut q;
        let mut first = true;
        let drained = drain(&mut a, 0, None, |_, _| {
            if first {
                // The driver adds one while the device works.
                q2.add_chain(&[(0x11_000, 16, W)]);
                first = false;
            }
            Handled::Used(1)
        });
        assert_eq!(drained, Drained::Empty);
        assert_eq!(q.used(), vec![(0, 1), (1, 1)]);
    }

    #[test]
    fn the_budget_ends_a_drain_and_says_so() {
        let m = mem();
        let mut q = TestQueue::new(&m, 0, 16);
        let mut a = activated(&q, &m);
        for _ in 0..3 {
            q.add_chain(&[(0x10_000, 16, R)]);
        }
        assert_eq!(
            drain(&mut a, 0, Some(2), |_, _| Handled::Used(0)),
            Drained::Budget
        );
        assert_eq!(q.used_idx(), 2);
        assert_eq!(
            drain(&mut a, 0, Some(2), |_, _| Handled::Used(0)),
            Drained::Empty
        );
        assert_eq!(q.used_idx(), 3);
    }

    #[test]
    fn a_stopped_chain_stays_at_the_head_of_the_queue() {
        let m = mem();
        let mut q = TestQueue::new(&m, 0, 16);
        let mut a = activated(&q, &m);
        q.add_chain(&[(0x10_000, 16, R)]);
        q.add_chain(&[(0x11_000, 16, R)]);
        assert_eq!(
            drain(&mut a, 0, None, |_, _| Handled::Stop),
            Drained::Stopped
        );
        assert_eq!(q.used_idx(), 0);
        assert!(a.interrupt.eventfd().read().is_err(), "nothing to signal");
        // Used, then stop: the second chain waits.
        assert_eq!(
            drain(&mut a, 0, None, |_, _| Handled::UsedAndStop(3)),
            Drained::Stopped
        );
        assert_eq!(q.used(), vec![(0, 3)]);
        let mut heads = Vec::new();
        drain(&mut a, 0, None, |_, chain| {
            heads.push(chain.head_index());
            Handled::Used(0)
        });
        assert_eq!(heads, vec![1]);
    }

    #[test]
    fn malformed_chains_are_completed_empty() {
        let m = mem();
        let mut q = TestQueue::new(&m, 0, 16);
        let mut a = activated(&q, &m);
        q.add_chain(&[(0x10_000, 16, R)]);
        q.add_chain(&[(0x11_000, 16, W)]);
        drain(&mut a, 0, None, |_, chain| {
            if chain.head_index() == 0 {
                Handled::Malformed(ChainError::NoWritable)
            } else {
                Handled::Used(16)
            }
        });
        assert_eq!(q.used(), vec![(0, 0), (1, 16)]);
        assert!(!a.broken);
    }

    #[test]
    fn a_broken_ring_needs_a_reset_and_is_left_alone() {
        let m = mem();
        let mut q = TestQueue::new(&m, 0, 16);
        let mut a = activated(&q, &m);
        q.add_chain(&[(0x10_000, 16, R)]);
        // A head the queue cannot hold, after a good chain.
        q.publish(16 + 5);
        let mut calls = 0;
        let drained = drain(&mut a, 0, None, |_, _| {
            calls += 1;
            Handled::Used(0)
        });
        assert_eq!(drained, Drained::Broken);
        assert!(a.broken && a.interrupt.needs_reset());
        // The good chain was used and signalled.
        assert_eq!(q.used(), vec![(0, 0)]);
        assert_ne!(a.interrupt.status() & crate::virtio::INT_VRING, 0);
        // Nothing more is taken until a reset.
        q.add_chain(&[(0x10_000, 16, R)]);
        assert_eq!(
            drain(&mut a, 0, None, |_, _| Handled::Used(0)),
            Drained::Broken
        );
        assert_eq!(calls, 2);
        // An available index beyond the queue size breaks it as well.
        let mut q = TestQueue::new(&m, 0x8000, 16);
        let mut a = activated(&q, &m);
        q.set_avail_idx(17);
        assert_eq!(
            drain(&mut a, 0, None, |_, _| Handled::Used(0)),
            Drained::Broken
        );
        assert!(a.interrupt.needs_reset());
    }

    #[test]
    fn the_chains_of_a_unit_are_completed_together() {
        let m = mem();
        let mut q = TestQueue::new(&m, 0, 16);
        let mut a = activated(&q, &m);
        for i in 0..4u64 {
            q.add_chain(&[(0x10_000 + i * 0x1000, 16, W)]);
        }
        let mut seen_used_idx = Vec::new();
        let q_ref = &q;
        let mut outcomes = [Handled::Part(16), Handled::Part(16), Handled::Used(3)].into_iter();
        let drained = drain(&mut a, 0, Some(1), |_, _| {
            // The driver sees nothing of the unit while it is built.
            seen_used_idx.push(q_ref.used_idx());
            outcomes.next().unwrap_or(Handled::Used(1))
        });
        // The budget of one counts the unit as a whole and is checked
        // between units only.
        assert_eq!(drained, Drained::Budget);
        assert_eq!(seen_used_idx, vec![0, 0, 0]);
        assert_eq!(q.used(), vec![(0, 16), (1, 16), (2, 3)]);
        assert_eq!(a.interrupt.eventfd().read().unwrap(), 1);
    }

    #[test]
    fn a_unit_the_ring_runs_out_for_goes_back_whole() {
        let m = mem();
        let mut q = TestQueue::new(&m, 0, 16);
        let mut a = activated(&q, &m);
        q.add_chain(&[(0x10_000, 16, W)]);
        q.add_chain(&[(0x11_000, 16, W)]);
        assert_eq!(
            drain(&mut a, 0, None, |_, _| Handled::Part(16)),
            Drained::Empty
        );
        assert_eq!(q.used_idx(), 0);
        assert!(a.interrupt.eventfd().read().is_err(), "nothing to signal");
        // With one more chain the unit fits, from its first chain.
        q.add_chain(&[(0x12_000, 16, W)]);
        let mut heads = Vec::new();
        drain(&mut a, 0, None, |_, chain| {
            heads.push(chain.head_index());
            if heads.len() < 3 {
                Handled::Part(16)
            } else {
                Handled::Used(16)
            }
        });
        assert_eq!(heads, vec![0, 1, 2]);
        assert_eq!(q.used(), vec![(0, 16), (1, 16), (2, 16)]);
    }

    #[test]
    fn a_stopped_or_malformed_unit_ends_with_its_parts() {
        let m = mem();
        let mut q = TestQueue::new(&m, 0, 16);
        let mut a = activated(&q, &m);
        for i in 0..3u64 {
            q.add_chain(&[(0x10_000 + i * 0x1000, 16, W)]);
        }
        let mut outcomes = [Handled::Part(16), Handled::Stop].into_iter();
        assert_eq!(
            drain(&mut a, 0, None, |_, _| outcomes.next().unwrap()),
            Drained::Stopped
        );
        assert_eq!(q.used_idx(), 0);
        let mut outcomes = [
            Handled::Part(16),
            Handled::Malformed(ChainError::NoWritable),
            Handled::Used(7),
        ]
        .into_iter();
        let mut heads = Vec::new();
        drain(&mut a, 0, None, |_, chain| {
            heads.push(chain.head_index());
            outcomes.next().unwrap()
        });
        assert_eq!(heads, vec![0, 1, 2]);
        assert_eq!(q.used(), vec![(0, 0), (1, 0), (2, 7)]);
    }
}
