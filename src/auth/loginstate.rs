//! What the tcpsplice-auth runs under one tcpsplice-listen share: a cache of verified
//! logins, so that a user's next connection skips the slow hash, a bound on the
//! password checks running at once, so that a login flood costs bounded memory and
//! other clients still get their turn, and the connections of each user who has a
//! limit of them (`-l`, `conns=` in the users file), so that one user cannot take
//! every connection.
//!
//! Both live in memory that tcpsplice-listen maps before it forks ([`create`]) and that
//! only its connection processes see: tcpsplice-auth finds it when it runs in such a
//! process (the chain's in-process continuation), and not when it was exec'd (inetd,
//! xinetd, systemd, `TCPSPLICE_EXEC=always`), where it checks every login in full and
//! does not wait for a slot, as before.
//!
//! A cache entry is HMAC-SHA256 under a random key made at [`create`] of the checker's
//! identity for the user (the users file's hash string, or the checkpassword program),
//! the user name and the password, with an expiry. Nothing else is kept: no password,
//! no unkeyed hash of one. Each process keeps the HMAC keyed once (`keyed`), derived
//! from the key it reads here anyway. A changed or removed users-file entry changes the MAC, so the
//! old one is never found again. Only successes are stored.
//!
//! A user's connection is counted in an entry owned by the pid of its connection
//! process: taken after the login ([`Region::count_user`]), given back when the
//! connection ends, by the process itself if it is reused for another one
//! ([`end_connection`], called by `listen::worker`) and else by tcpsplice-listen when it
//! reaps the process ([`release_pid`]), however the process died. A process holds at
//! most one entry, and serves one connection at a time.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use super::password::Secret;
use super::request::{Checker, Verdict};
use crate::shm;

/// Verified logins kept, at most; when a bucket is full the entry nearest its expiry
/// makes way.
pub const ENTRIES: usize = 4096;
const WAYS: usize = 4;
/// The most password checks `-j` may allow at once.
pub const MAX_SLOTS: usize = 64;
/// Connections counted against per-user limits at once: as many as tcpsplice-listen's
/// `-c` may allow (100000), so with one entry per connection the table cannot fill.
/// Only the entries used so far are ever touched.
pub const MAX_CONNS: usize = 100_000;

#[repr(C)]
struct Entry {
    /// Even when the entry is whole, odd while a process writes it.
    seq: AtomicU32,
    /// CLOCK_MONOTONIC milliseconds after which the entry is void; 0 for none.
    expires: AtomicU64,
    tag: [AtomicU64; 4],
}

#[repr(C)]
pub struct Region {
    key: [AtomicU64; 4],
    /// Bumped at each release of a slot; waiters sleep on it.
    released: AtomicU32,
    /// The pid of the process running a check in each slot, 0 when free.
    slots: [AtomicU32; MAX_SLOTS],
    /// The client address each slot's check is for (a hash of it; 0 for none known).
    sources: [AtomicU64; MAX_SLOTS],
    /// The pid of the process counting and taking a slot, 0 when none: counting an
    /// address's slots and taking one must be one step, or two logins from one
    /// address at the same instant both find its share free and both take a slot.
    taking: AtomicU32,
    entries: [Entry; ENTRIES],
    /// One past the highest connection entry ever taken: scans stop there.
    conn_top: AtomicU32,
    /// The pid of the connection process each entry is counted for, 0 when free.
    conn_pids: [AtomicU32; MAX_CONNS],
    /// The user each entry counts (a key from `user_key`), 0 while being taken or
    /// given back.
    conn_users: [AtomicU64; MAX_CONNS],
}

// SAFETY: Region and Entry are repr(C) structs of atomics only.
unsafe impl shm::Zeroable for Region {}
// SAFETY: as above.
unsafe impl shm::Zeroable for Entry {}

static REGION: OnceLock<&'static Region> = OnceLock::new();

/// Maps the shared state and makes its key; tcpsplice-listen calls it before the first
/// fork, when PROG... starts with tcpsplice-auth continuing in its processes.
pub fn create() -> std::io::Result<()> {
    let region: &'static Region = shm::shared()?;
    let mut key = [0u8; 32];
    shm::random(&mut key)?;
    for (k, chunk) in region.key.iter().zip(key.chunks_exact(8)) {
        let mut b = [0u8; 8];
        b.copy_from_slice(chunk);
        k.store(u64::from_ne_bytes(b), Ordering::Relaxed);
    }
    key.iter_mut().for_each(|b| *b = 0);
    let _ = REGION.set(region);
    Ok(())
}

/// The shared state, when this process is one of tcpsplice-listen's.
pub fn region() -> Option<&'static Region> {
    REGION.get().copied()
}

/// How the last successful check of a [`Gate`] went, for the log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Login {
    /// Found in the cache: no hash was computed.
    Cached,
    /// Checked in full.
    Verified,
}

impl Login {
    pub fn as_str(self) -> &'static str {
        match self {
            Login::Cached => "cached",
            Login::Verified => "verified",
        }
    }
}

/// A checker behind the shared state: cache first, then the real check in a slot.
pub struct Gate<'a> {
    pub inner: &'a dyn Checker,
    pub region: Option<&'static Region>,
    /// How long a verified login is remembered; zero turns the cache off.
    pub ttl: Duration,
    /// Checks allowed at once over the whole tree (1 to MAX_SLOTS); 0 for the
    /// default, the number of CPUs from 2 to 8.
    pub slots: usize,
    /// When waiting for a slot must give up: the handshake's deadline.
    pub deadline: Instant,
    /// The client's address (`TCPREMOTEIP`), so that one address cannot hold more than
    /// half of the slots.
    pub source: Option<std::net::IpAddr>,
    pub outcome: std::cell::Cell<Option<Login>>,
}

impl Checker for Gate<'_> {
    fn check(&self, user: &[u8], password: &Secret) -> Verdict {
        let cached = self.region.filter(|_| !self.ttl.is_zero()).and_then(|r| {
            let (identity, rules) = self.inner.cache_key(user)?;
            Some((r, tag(r, identity, user, password), rules))
        });
        if let Some((r, t, rules)) = &cached {
            if r.lookup(t) {
                self.outcome.set(Some(Login::Cached));
                return Verdict::Accept {
                    rules: rules.map(str::to_owned),
                };
            }
        }
        let verdict = match self.slot() {
            Ok(_slot) => {
                // Another connection may have verified the same login while this one
                // waited for a slot (a browser opens many at once, a proxy that just
                // started has an empty cache): found now, it costs no hash. A wrong
                // password's tag is never there, so it still pays in full.
                if let Some((r, t, rules)) = &cached {
                    if r.lookup(t) {
                        self.outcome.set(Some(Login::Cached));
                        return Verdict::Accept {
                            rules: rules.map(str::to_owned),
                        };
                    }
                }
                let verdict = self.inner.check(user, password);
                // Stored before the slot is given back, so that whoever takes it next
                // finds it.
                if let (Verdict::Accept { .. }, Some((r, t, _))) = (&verdict, &cached) {
                    r.insert(t, self.ttl);
                }
                verdict
            }
            Err(why) => return Verdict::Temporary(why),
        };
        if let Verdict::Accept { .. } = verdict {
            self.outcome.set(Some(Login::Verified));
        }
        verdict
    }

    fn waste_time(&self, password: &Secret) {
        if let Ok(_slot) = self.slot() {
            self.inner.waste_time(password);
        }
    }
}

impl Gate<'_> {
    fn slot(&self) -> Result<Option<Slot>, String> {
        match self.region {
            None => Ok(None),
            Some(r) => {
                let n = match self.slots {
                    0 => std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8)),
                    n => n,
                };
                r.acquire(n, source_key(self.source), self.deadline)
                    .map(Some)
            }
        }
    }
}

/// A nonzero key for a client address (FNV-1a of its bytes; only compared, never a
/// secret).
fn source_key(source: Option<std::net::IpAddr>) -> u64 {
    match source {
        None => 0,
        Some(std::net::IpAddr::V4(a)) => fnv(&a.octets()),
        Some(std::net::IpAddr::V6(a)) => fnv(&a.octets()),
    }
}

/// A nonzero key for a user name. The names are the users file's, chosen by whoever
/// writes it, so a 64-bit hash need not resist made-up collisions.
fn user_key(user: &[u8]) -> u64 {
    fnv(user)
}

fn fnv(bytes: &[u8]) -> u64 {
    let h = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    h.max(1)
}

/// The connection entry this process holds (its index + 1), 0 for none.
static HELD: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Why a connection was not counted for its user.
#[derive(Debug, PartialEq, Eq)]
pub enum Over {
    /// The user already has this many connections, the limit or more.
    Limit(usize),
    /// Every entry is taken (more connections than tcpsplice-listen's -c allows).
    Full,
}

/// Gives back the connection entry this process holds, if any: its connection ended.
pub fn end_connection() {
    let held = HELD.swap(0, Ordering::SeqCst);
    if let (Some(r), Some(i)) = (region(), held.checked_sub(1)) {
        r.release(i, shm::pid());
    }
}

/// Gives back the connection entry of process `pid`, which tcpsplice-listen has just
/// reaped: killed in the middle of a connection, it could not.
pub fn release_pid(pid: libc::pid_t) {
    let (Some(r), Ok(pid)) = (region(), u32::try_from(pid)) else {
        return;
    };
    let top = (r.conn_top.load(Ordering::SeqCst) as usize).min(MAX_CONNS);
    if let Some(i) = r.conn_pids[..top]
        .iter()
        .position(|p| p.load(Ordering::SeqCst) == pid)
    {
        r.release(i, pid);
    }
}

/// The MAC keyed with `r`'s key, keyed once per process: keying compresses two blocks
/// of SHA-256 (the key's inner and outer pads), as many as a cached login's own bytes
/// take. What is kept is made from the key, which this process reads in the region
/// anyway; nothing of a login is in it.
fn keyed(r: &'static Region) -> Option<Hmac<Sha256>> {
    static KEYED: Mutex<Option<(usize, Hmac<Sha256>)>> = Mutex::new(None);
    let at = std::ptr::from_ref(r) as usize;
    let mut kept = KEYED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((region, mac)) = &*kept {
        if *region == at {
            return Some(mac.clone());
        }
    }
    let mut key = [0u8; 32];
    for (chunk, k) in key.chunks_exact_mut(8).zip(&r.key) {
        chunk.copy_from_slice(&k.load(Ordering::Relaxed).to_ne_bytes());
    }
    let mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&key);
    key.iter_mut().for_each(|b| *b = 0);
    let mac = mac.ok()?;
    *kept = Some((at, mac.clone()));
    Some(mac)
}

fn tag(r: &'static Region, identity: &[u8], user: &[u8], password: &Secret) -> [u64; 4] {
    let Some(mut mac) = keyed(r) else {
        return [0; 4];
    };
    // Each field with its length in front, so that no two inputs run together.
    for field in [identity, user, password.as_bytes()] {
        mac.update(&(field.len() as u64).to_be_bytes());
        mac.update(field);
    }
    let out = mac.finalize().into_bytes();
    let mut t = [0u64; 4];
    for (w, chunk) in t.iter_mut().zip(out.chunks_exact(8)) {
        let mut b = [0u8; 8];
        b.copy_from_slice(chunk);
        *w = u64::from_ne_bytes(b);
    }
    t
}

/// A slot held for one password check, given back when dropped.
pub struct Slot {
    region: &'static Region,
    index: usize,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.region.sources[self.index].store(0, Ordering::Relaxed);
        self.region.slots[self.index].store(0, Ordering::Release);
        self.region.released.fetch_add(1, Ordering::Release);
        // All of them: a waiter whose address already holds its share cannot take this
        // slot, and must not be the only one told of it.
        shm::wake(&self.region.released, i32::MAX);
    }
}

/// How long a waiter sleeps before it looks for slots whose process died holding them.
const RECHECK: Duration = Duration::from_millis(100);

impl Region {
    /// Counts this process's connection for `user`, who may have at most `max` at
    /// once; Err when that many are counted already (or no entry is free). Held until
    /// [`end_connection`] or the process's end.
    ///
    /// The entry is taken first and the user's entries counted after: of processes
    /// that race for the last place, the last to take its entry sees all the others',
    /// so never more than `max` get in (at worst, racers all see too many and all are
    /// refused).
    pub fn count_user(&'static self, user: &[u8], max: usize) -> Result<(), Over> {
        end_connection();
        let me = shm::pid();
        let key = user_key(user);
        let Some(i) = self.conn_pids.iter().position(|p| {
            p.load(Ordering::Relaxed) == 0
                && p.compare_exchange(0, me, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
        }) else {
            return Err(Over::Full);
        };
        self.conn_users[i].store(key, Ordering::SeqCst);
        self.conn_top.fetch_max(i as u32 + 1, Ordering::SeqCst);
        let top = (self.conn_top.load(Ordering::SeqCst) as usize).min(MAX_CONNS);
        let held = (0..top)
            .filter(|&j| {
                self.conn_users[j].load(Ordering::SeqCst) == key
                    && self.conn_pids[j].load(Ordering::SeqCst) != 0
            })
            .count();
        if held > max {
            self.release(i, me);
            return Err(Over::Limit(held - 1));
        }
        HELD.store(i + 1, Ordering::SeqCst);
        Ok(())
    }

    /// Frees connection entry `i` if `pid` holds it. The user first, so that whoever
    /// takes the entry next never finds it counting the old user.
    fn release(&self, i: usize, pid: u32) {
        if self.conn_pids[i].load(Ordering::SeqCst) == pid {
            self.conn_users[i].store(0, Ordering::SeqCst);
            let _ = self.conn_pids[i].compare_exchange(pid, 0, Ordering::SeqCst, Ordering::SeqCst);
        }
    }

    fn bucket(&self, t: &[u64; 4]) -> &[Entry] {
        let first = (t[0] as usize % (ENTRIES / WAYS)) * WAYS;
        &self.entries[first..first + WAYS]
    }

    fn lookup(&self, t: &[u64; 4]) -> bool {
        let now = shm::monotonic_ms();
        self.bucket(t).iter().any(|e| {
            let before = e.seq.load(Ordering::Acquire);
            if before % 2 == 1 {
                return false;
            }
            let same = e
                .tag
                .iter()
                .zip(t)
                .all(|(a, b)| a.load(Ordering::Relaxed) == *b);
            let expires = e.expires.load(Ordering::Relaxed);
            // A write that overlapped the reads makes them worthless: a miss.
            std::sync::atomic::fence(Ordering::Acquire);
            same && now < expires && e.seq.load(Ordering::Relaxed) == before
        })
    }

    fn insert(&self, t: &[u64; 4], ttl: Duration) {
        let expires =
            shm::monotonic_ms().saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
        let bucket = self.bucket(t);
        // The entry of the same login if there is one, else the one that expires first.
        let same = |e: &&Entry| {
            e.tag
                .iter()
                .zip(t)
                .all(|(a, b)| a.load(Ordering::Relaxed) == *b)
        };
        let victim = bucket.iter().find(same).or_else(|| {
            bucket
                .iter()
                .min_by_key(|e| e.expires.load(Ordering::Relaxed))
        });
        let Some(e) = victim else { return };
        let seq = e.seq.load(Ordering::Relaxed);
        // Another process writing it: leave it to that one. (One killed mid-write
        // leaves the entry odd, out of use; its bucket's other ways still serve.)
        if seq % 2 == 1
            || e.seq
                .compare_exchange(
                    seq,
                    seq.wrapping_add(1),
                    Ordering::Acquire,
                    Ordering::Relaxed,
                )
                .is_err()
        {
            return;
        }
        std::sync::atomic::fence(Ordering::Release);
        e.expires.store(0, Ordering::Relaxed);
        for (a, b) in e.tag.iter().zip(t) {
            a.store(*b, Ordering::Relaxed);
        }
        e.expires.store(expires, Ordering::Relaxed);
        e.seq.store(seq.wrapping_add(2), Ordering::Release);
    }

    /// Takes one of the first `n` slots for a check for the client `source` (a key
    /// from `source_key`), waiting for one until `deadline`. One address may hold at
    /// most half of them (at least one): a flood of logins from it queues behind
    /// itself, and the other slots stay free for everyone else.
    fn acquire(&'static self, n: usize, source: u64, deadline: Instant) -> Result<Slot, String> {
        let n = n.clamp(1, MAX_SLOTS);
        let share = (n / 2).max(1);
        let me = shm::pid();
        loop {
            // Read before looking, so that a release after the look wakes the wait.
            let released = self.released.load(Ordering::Acquire);
            let held = self.sources[..n]
                .iter()
                .filter(|s| source != 0 && s.load(Ordering::Relaxed) == source)
                .count();
            if held < share {
                let taken = shm::locked(&self.taking, || {
                    let held = self.sources[..n]
                        .iter()
                        .filter(|s| source != 0 && s.load(Ordering::Relaxed) == source)
                        .count();
                    if held >= share {
                        return None;
                    }
                    let (index, _) = self.slots[..n].iter().enumerate().find(|(_, s)| {
                        s.compare_exchange(0, me, Ordering::Acquire, Ordering::Relaxed)
                            .is_ok()
                    })?;
                    self.sources[index].store(source, Ordering::Relaxed);
                    Some(index)
                });
                if let Some(index) = taken {
                    return Ok(Slot {
                        region: self,
                        index,
                    });
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(format!(
                    "no password check slot came free in time ({n} busy)"
                ));
            }
            shm::wait(
                &self.released,
                released,
                deadline.saturating_duration_since(now).min(RECHECK),
            );
            // A process killed during its check never gives its slot back.
            for (s, src) in self.slots[..n].iter().zip(&self.sources) {
                let owner = s.load(Ordering::Relaxed);
                if owner != 0 && !shm::alive(owner) {
                    src.store(0, Ordering::Relaxed);
                    let _ = s.compare_exchange(owner, 0, Ordering::Relaxed, Ordering::Relaxed);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The MAC of a login keyed afresh, as every login computed it before the keyed
    /// state was kept: the kept one must give the same tags.
    fn tag_keyed_afresh(r: &Region, identity: &[u8], user: &[u8], password: &[u8]) -> [u64; 4] {
        let mut key = [0u8; 32];
        for (chunk, k) in key.chunks_exact_mut(8).zip(&r.key) {
            chunk.copy_from_slice(&k.load(Ordering::Relaxed).to_ne_bytes());
        }
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&key).expect("a 32-byte key");
        for field in [identity, user, password] {
            mac.update(&(field.len() as u64).to_be_bytes());
            mac.update(field);
        }
        let out = mac.finalize().into_bytes();
        let mut t = [0u64; 4];
        for (w, chunk) in t.iter_mut().zip(out.chunks_exact(8)) {
            *w = u64::from_ne_bytes(chunk.try_into().expect("8 bytes"));
        }
        t
    }

    #[test]
    fn the_kept_key_gives_the_tags_of_a_fresh_one() {
        create().expect("map the login state");
        let r = region().expect("the login state");
        let pw = Secret::new(b"benchpw".to_vec());
        let first = tag(r, b"$y$j9T$salt$hash", b"bench", &pw);
        assert_eq!(
            first,
            tag_keyed_afresh(r, b"$y$j9T$salt$hash", b"bench", b"benchpw")
        );
        // Again, from the kept state: the same tag, and another for another field.
        assert_eq!(tag(r, b"$y$j9T$salt$hash", b"bench", &pw), first);
        assert_ne!(tag(r, b"$y$j9T$salt$hasi", b"bench", &pw), first);
        assert_ne!(tag(r, b"$y$j9T$salt$hash", b"bencH", &pw), first);
        let other = Secret::new(b"benchpW".to_vec());
        assert_ne!(tag(r, b"$y$j9T$salt$hash", b"bench", &other), first);
    }
}
