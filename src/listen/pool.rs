//! The books of tcpsplice-listen's connection processes when they accept for themselves
//! (see `worker`): one slot per process in memory shared by the supervisor and all of
//! them, saying whether it waits for a connection or serves one, and whom.
//!
//! Why shared memory: a process that accepts a connection on its own must book it where
//! the others and the supervisor see it at once, without waking the supervisor (a hand-
//! over through the supervisor costs a wakeup of it and a message each way per
//! connection, about an eighth of what a short connection costs). From the slots come
//! the per-source count (`-C`), checked and booked under one lock so that two processes
//! accepting from one address at the same instant cannot both pass it; the count in the
//! log lines; whether any process is left waiting, which tells the supervisor to accept
//! (and fork) itself; and, when a process dies serving a connection, what the
//! supervisor logs for it. Slots are given out and taken back by the supervisor only, at
//! fork and at reaping; a process writes only its own slot.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::unix::io::RawFd;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::{shm, sys};

/// No process, or one not booked yet.
const NONE: u32 = 0;
/// Its process waits for a connection.
const IDLE: u32 = 1;
/// Its process serves a connection.
const BUSY: u32 = 2;

#[repr(C)]
struct Slot {
    /// Given out to a process by the supervisor (which alone writes it): here rather
    /// than in the supervisor's heap, a page of which each fork would leave private to
    /// the process forked before (ARCHITECTURE.md, "Memory of an idle connection").
    given: AtomicU32,
    state: AtomicU32,
    /// The client's address as IPv6 (IPv4 mapped), in network order, and its port.
    ip: [AtomicU32; 4],
    port: AtomicU32,
    /// When the connection started, `shm::monotonic_ms`.
    start_ms: AtomicU64,
}

// SAFETY: a repr(C) struct of atomics: valid as zero bytes, no pointer.
unsafe impl shm::Zeroable for Slot {}

/// The lock word and the number of slots in use at most (the supervisor gives out the
/// lowest free one, so every booked slot is below it and a scan stops there).
#[repr(C)]
struct Head {
    lock: AtomicU32,
    high: AtomicU32,
}

// SAFETY: as for `Slot`.
unsafe impl shm::Zeroable for Head {}

/// The shared books; made by the supervisor before its first fork.
#[derive(Clone)]
pub struct Pool {
    head: &'static Head,
    slots: &'static [Slot],
    /// An eventfd the supervisor polls: a process that took the last waiting slot adds
    /// to it, so that the supervisor accepts (and forks) the next connection itself.
    wake: RawFd,
    max_per_ip: Option<usize>,
}

/// How long the supervisor tries for the lock: a few yields and sleeps, some
/// milliseconds at worst. A holder takes microseconds; one that takes longer is stopped,
/// or died in it and is a zombie until the supervisor reaps it.
const SUPERVISOR_TRIES: u32 = 80;

/// Why a connection was not booked.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// Its source holds this many connections, the most `-C` allows.
    Full(usize),
    /// The lock was held too long (the supervisor's try only).
    Busy,
}

/// A connection booked in a slot.
pub struct Booked {
    pub client: SocketAddr,
    pub start_ms: u64,
}

impl Pool {
    /// Books for `max` processes (`-c`: each serves one connection at a time).
    pub fn new(max: usize, max_per_ip: Option<usize>) -> std::io::Result<Pool> {
        Ok(Pool {
            head: shm::shared()?,
            slots: shm::shared_slice(max)?,
            // Out of the chain's way already: a connection process keeps it as it is.
            wake: sys::fd_move_up(sys::eventfd()?, super::worker::RESERVED_MIN)?,
            max_per_ip,
        })
    }

    pub fn wake_fd(&self) -> RawFd {
        self.wake
    }

    pub fn max_per_ip(&self) -> Option<usize> {
        self.max_per_ip
    }

    /// The supervisor: gives out the lowest free slot, if any.
    pub fn give(&self) -> Option<usize> {
        let i = self
            .slots
            .iter()
            .position(|s| s.given.load(Ordering::Relaxed) == 0)?;
        self.slots[i].given.store(1, Ordering::Relaxed);
        let high = self.head.high.load(Ordering::SeqCst) as usize;
        if i >= high {
            self.head
                .high
                .store(u32::try_from(i + 1).unwrap_or(u32::MAX), Ordering::SeqCst);
        }
        Some(i)
    }

    /// Slot `i` is given out no more; its state is already NONE.
    fn take_back(&self, i: usize) {
        let Some(s) = self.slots.get(i) else {
            return;
        };
        s.given.store(0, Ordering::Relaxed);
        let mut high = (self.head.high.load(Ordering::SeqCst) as usize).min(self.slots.len());
        while high > 0 && self.slots[high - 1].given.load(Ordering::Relaxed) == 0 {
            high -= 1;
        }
        self.head
            .high
            .store(u32::try_from(high).unwrap_or(u32::MAX), Ordering::SeqCst);
    }

    fn in_use(&self) -> &[Slot] {
        let high = self.head.high.load(Ordering::SeqCst) as usize;
        &self.slots[..high.min(self.slots.len())]
    }

    /// Books `client`'s connection in slot `i`, unless its address already holds the
    /// most connections `-C` allows: then returns how many it holds.
    pub fn admit(&self, i: usize, client: SocketAddr) -> Result<(), Refused> {
        self.admit_within(i, client, u32::MAX)
    }

    /// [`admit`](Self::admit) by the supervisor, which gives up on a lock held too long
    /// (`Refused::Busy`): the process it forks books the connection then.
    pub fn admit_soon(&self, i: usize, client: SocketAddr) -> Result<(), Refused> {
        self.admit_within(i, client, SUPERVISOR_TRIES)
    }

    fn admit_within(&self, i: usize, client: SocketAddr, tries: u32) -> Result<(), Refused> {
        let Some(slot) = self.slots.get(i) else {
            return Ok(());
        };
        let v6 = match client.ip() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        let words: [u32; 4] = std::array::from_fn(|k| {
            let o = v6.octets();
            u32::from_ne_bytes([o[4 * k], o[4 * k + 1], o[4 * k + 2], o[4 * k + 3]])
        });
        let book = || {
            for (w, v) in slot.ip.iter().zip(words) {
                w.store(v, Ordering::Relaxed);
            }
            slot.port.store(u32::from(client.port()), Ordering::Relaxed);
            slot.start_ms.store(shm::monotonic_ms(), Ordering::Relaxed);
            slot.state.store(BUSY, Ordering::SeqCst);
        };
        let Some(max) = self.max_per_ip else {
            book();
            return Ok(());
        };
        let checked = shm::try_locked(&self.head.lock, tries, || {
            let held = self
                .in_use()
                .iter()
                .filter(|s| {
                    s.state.load(Ordering::SeqCst) == BUSY
                        && s.ip
                            .iter()
                            .zip(words)
                            .all(|(w, v)| w.load(Ordering::Relaxed) == v)
                })
                .count();
            if held >= max {
                return Err(Refused::Full(held));
            }
            book();
            Ok(())
        });
        checked.unwrap_or(Err(Refused::Busy))
    }

    /// Slot `i`'s process waits for a connection.
    pub fn set_idle(&self, i: usize) {
        if let Some(s) = self.slots.get(i) {
            s.state.store(IDLE, Ordering::SeqCst);
        }
    }

    /// Slot `i`'s process serves its booked connection still (it could not go back to
    /// waiting, and exits with it).
    pub fn set_busy(&self, i: usize) {
        if let Some(s) = self.slots.get(i) {
            s.state.store(BUSY, Ordering::SeqCst);
        }
    }

    /// The supervisor, at reaping slot `i`'s process (or when it was never forked): the
    /// connection it was serving, if any; the slot is free again.
    pub fn release(&self, i: usize) -> Option<Booked> {
        let s = self.slots.get(i)?;
        let was = s.state.swap(NONE, Ordering::SeqCst);
        self.take_back(i);
        (was == BUSY).then(|| {
            let mut o = [0u8; 16];
            for (k, w) in s.ip.iter().enumerate() {
                o[4 * k..4 * k + 4].copy_from_slice(&w.load(Ordering::Relaxed).to_ne_bytes());
            }
            let v6 = Ipv6Addr::from(o);
            let ip = v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4);
            let port = u16::try_from(s.port.load(Ordering::Relaxed)).unwrap_or(0);
            Booked {
                client: SocketAddr::new(ip, port),
                start_ms: s.start_ms.load(Ordering::Relaxed),
            }
        })
    }

    /// Whether slot `i`'s process waits for a connection.
    pub fn is_idle(&self, i: usize) -> bool {
        self.slots
            .get(i)
            .is_some_and(|s| s.state.load(Ordering::SeqCst) == IDLE)
    }

    /// Connections being served.
    pub fn busy(&self) -> usize {
        self.count(BUSY)
    }

    /// Whether a process waits for a connection.
    pub fn any_idle(&self) -> bool {
        self.in_use()
            .iter()
            .any(|s| s.state.load(Ordering::SeqCst) == IDLE)
    }

    fn count(&self, state: u32) -> usize {
        self.in_use()
            .iter()
            .filter(|s| s.state.load(Ordering::SeqCst) == state)
            .count()
    }

    /// A process took a connection: when no other waits, the supervisor must accept the
    /// next one itself.
    pub fn took(&self) {
        if !self.any_idle() {
            let _ = sys::eventfd_add(self.wake);
        }
    }

    /// The supervisor, woken by [`took`](Self::took): clears the wakeup.
    pub fn take_wake(&self) {
        sys::eventfd_take(self.wake);
    }
}
