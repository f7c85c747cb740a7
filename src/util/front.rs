//! A per-thread, direct-mapped front for a shared cache.
//!
//! The token and decision caches are moka caches shared by every proxy
//! worker. A moka hit is not free: its concurrent hash table, the entry's
//! reference counts and the recording of the read for its eviction policy
//! touch several cache lines that other threads write, which under 10k
//! distinct tokens cost about 8% of a request. A worker (one thread, see
//! `server.rs`) first looks in its own small array, indexed by bits of a
//! hash of the key: one slot, one exact comparison of the key, no lock and
//! no shared write but the value's reference count.
//!
//! It never changes what a lookup means. Every hit is checked exactly as a
//! hit in the shared cache is (the callers do that), a slot belongs to one
//! owner (one authenticator, one policy engine: a reload makes a new owner,
//! and a worker seeing a new owner starts empty), and an owner whose shared
//! cache has no capacity never uses a front. Memory is bounded: `SLOTS`
//! slots per thread and cache, allocated on first use.

use std::sync::atomic::{AtomicU64, Ordering};

/// Slots per thread and cache (a power of two). With 10k keys used
/// uniformly, about three quarters of lookups hit (a slot holds the last of
/// the keys that map to it: with k keys per slot on average, (1 - e^-k) / k
/// hit).
pub const SLOTS: usize = 1 << 14;

/// A fresh owner id: one per authenticator or engine, never reused.
pub fn new_owner() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// One thread's front: `SLOTS` slots of key and value, for one owner at a
/// time.
#[derive(Debug)]
pub struct Front<K, V> {
    owner: u64,
    slots: Vec<Option<(K, V)>>,
}

impl<K: Eq, V: Clone> Front<K, V> {
    /// An empty front (no memory until the first insert).
    pub const fn new() -> Self {
        Self {
            owner: 0,
            slots: Vec::new(),
        }
    }

    /// The value under `key`, if this thread holds it for `owner`; `bits`
    /// are uniform bits of the key (they pick the slot).
    pub fn get(&self, owner: u64, bits: u64, key: &K) -> Option<V> {
        if self.owner != owner {
            return None;
        }
        match self.slots.get(slot(bits)) {
            Some(Some((k, v))) if k == key => Some(v.clone()),
            _ => None,
        }
    }

    /// Puts `value` under `key`, replacing whatever held its slot.
    pub fn put(&mut self, owner: u64, bits: u64, key: K, value: V) {
        if self.owner != owner || self.slots.is_empty() {
            self.owner = owner;
            self.slots.clear();
            self.slots.resize_with(SLOTS, || None);
        }
        if let Some(s) = self.slots.get_mut(slot(bits)) {
            *s = Some((key, value));
        }
    }

    /// Forgets `key` (if its slot holds it).
    pub fn remove(&mut self, owner: u64, bits: u64, key: &K) {
        if self.owner != owner {
            return;
        }
        if let Some(s) = self.slots.get_mut(slot(bits))
            && s.as_ref().is_some_and(|(k, _)| k == key)
        {
            *s = None;
        }
    }
}

impl<K: Eq, V: Clone> Default for Front<K, V> {
    fn default() -> Self {
        Self::new()
    }
}

fn slot(bits: u64) -> usize {
    (bits as usize) & (SLOTS - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hit_needs_the_same_owner_and_key() {
        let mut f: Front<u128, u32> = Front::new();
        assert_eq!(f.get(1, 5, &5), None);
        f.put(1, 5, 5, 50);
        assert_eq!(f.get(1, 5, &5), Some(50));
        // Same slot, other key: a miss, never the other key's value.
        assert_eq!(f.get(1, 5 + SLOTS as u64, &6), None);
        // Another owner (a reloaded engine) sees nothing, and takes over.
        assert_eq!(f.get(2, 5, &5), None);
        f.put(2, 7, 7, 70);
        assert_eq!(f.get(1, 5, &5), None);
        assert_eq!(f.get(2, 5, &5), None);
        assert_eq!(f.get(2, 7, &7), Some(70));
        f.remove(2, 7, &8);
        assert_eq!(f.get(2, 7, &7), Some(70));
        f.remove(2, 7, &7);
        assert_eq!(f.get(2, 7, &7), None);
    }

    #[test]
    fn owners_are_unique() {
        let a = new_owner();
        let b = new_owner();
        assert_ne!(a, b);
        assert_ne!(a, 0);
    }

    #[test]
    fn keys_compare_whole() {
        let mut f: Front<Box<[u8]>, u32> = Front::new();
        let k = |b: &[u8]| Box::<[u8]>::from(b);
        f.put(1, 3, k(b"token-a"), 1);
        assert_eq!(f.get(1, 3, &k(b"token-a")), Some(1));
        assert_eq!(f.get(1, 3, &k(b"token-b")), None);
        assert_eq!(f.get(1, 3, &k(b"token-")), None);
    }
}
