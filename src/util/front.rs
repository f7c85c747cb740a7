//! A per-thread, set-associative front for a shared cache.
//!
//! The token and decision caches are moka caches shared by every proxy
//! worker. A moka hit is not free: its concurrent hash table, the entry's
//! reference counts and the recording of the read for its eviction policy
//! touch several cache lines that other threads write, which under 10k
//! distinct tokens cost about 8% of a request. A worker (one thread, see
//! `server.rs`) first looks in its own small array: the key's set, picked
//! by bits of a hash of the key, holds `WAYS` entries, each compared
//! exactly; no lock and no shared write but the value's reference count.
//!
//! It never changes what a lookup means. Every hit is checked exactly as a
//! hit in the shared cache is (the callers do that), a front belongs to one
//! owner (one authenticator, one policy engine: a reload makes a new owner,
//! and a worker seeing a new owner starts empty), and an owner whose shared
//! cache has no capacity never uses a front. Memory is bounded: `SETS` ×
//! `WAYS` entries per thread and cache, allocated on first use.

use std::sync::atomic::{AtomicU64, Ordering};

/// Entries per set. Four entries of a 64-bit key and an `Arc` fill one cache
/// line, and a key is found among them by a short scan.
pub const WAYS: usize = 4;

/// Sets per thread and cache (a power of two): 32k entries. Why sets and
/// not one slot per key: with 10k keys visited in turn (the load script's
/// 10k-token mode, and any population larger than a slot array visited
/// round-robin), a direct-mapped array of 16k slots keeps only the keys
/// alone in their slot, e^-0.61 ≈ 54% of them; every other key evicts its
/// neighbour each round. Here a key stays unless five or more of the keys
/// share its set: about 96% of 10k keys stay (Poisson, mean 1.22 per set).
pub const SETS: usize = 1 << 13;

/// A fresh owner id: one per authenticator or engine, never reused.
pub fn new_owner() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// One thread's front: `SETS` sets of `WAYS` entries, for one owner at a
/// time.
#[derive(Debug)]
pub struct Front<K, V> {
    owner: u64,
    sets: Vec<Set<K, V>>,
}

/// One set, newest entry first, aligned to a cache line.
#[derive(Debug)]
#[repr(align(64))]
struct Set<K, V>([Option<(K, V)>; WAYS]);

impl<K, V> Set<K, V> {
    const EMPTY: Self = Self([const { None }; WAYS]);
}

impl<K: Eq, V: Clone> Front<K, V> {
    /// An empty front (no memory until the first insert).
    pub const fn new() -> Self {
        Self {
            owner: 0,
            sets: Vec::new(),
        }
    }

    /// The value under `key`, if this thread holds it for `owner`; `bits`
    /// are uniform bits of the key (they pick the set).
    pub fn get(&self, owner: u64, bits: u64, key: &K) -> Option<V> {
        self.find(owner, bits, key).cloned()
    }

    /// [`Front::get`] by reference: the caller can read the value before
    /// it clones it (an `Arc`'s count is a locked write, which waits for
    /// the reads issued before it).
    pub fn find(&self, owner: u64, bits: u64, key: &K) -> Option<&V> {
        if self.owner != owner {
            return None;
        }
        let set = self.sets.get(set_index(bits))?;
        set.0.iter().find_map(|e| match e {
            Some((k, v)) if k == key => Some(v),
            _ => None,
        })
    }

    /// Puts `value` under `key`: in place of `key`'s old entry if its set
    /// has one, else as the set's newest entry, dropping its oldest.
    pub fn put(&mut self, owner: u64, bits: u64, key: K, value: V) {
        if self.owner != owner || self.sets.is_empty() {
            self.owner = owner;
            self.sets.clear();
            self.sets.resize_with(SETS, || Set::EMPTY);
        }
        let Some(set) = self.sets.get_mut(set_index(bits)) else {
            return;
        };
        let ways = &mut set.0;
        // The ways to shift by one: up to the key's own entry, else up to
        // the first empty way, else all (the oldest entry goes).
        let end = ways
            .iter()
            .position(|e| e.as_ref().is_some_and(|(k, _)| *k == key))
            .or_else(|| ways.iter().position(Option::is_none))
            .unwrap_or(WAYS - 1);
        if let Some(shifted) = ways.get_mut(..=end) {
            shifted.rotate_right(1);
        }
        if let Some(newest) = ways.first_mut() {
            *newest = Some((key, value));
        }
    }

    /// Forgets `key` (if its set holds it).
    pub fn remove(&mut self, owner: u64, bits: u64, key: &K) {
        if self.owner != owner {
            return;
        }
        if let Some(set) = self.sets.get_mut(set_index(bits)) {
            for e in &mut set.0 {
                if e.as_ref().is_some_and(|(k, _)| k == key) {
                    *e = None;
                }
            }
        }
    }
}

impl<K: Eq, V: Clone> Default for Front<K, V> {
    fn default() -> Self {
        Self::new()
    }
}

fn set_index(bits: u64) -> usize {
    (bits as usize) & (SETS - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_set_of_the_token_and_decision_fronts_is_one_cache_line() {
        // Both fronts key by 64 bits and hold an `Arc`: four ways in 64
        // bytes, so a lookup reads one line (a 128-bit key made it two,
        // and the decision front 1 MiB per thread instead of 512 KiB).
        assert_eq!(std::mem::size_of::<Set<u64, std::sync::Arc<()>>>(), 64);
        assert_eq!(SETS * 64, 512 * 1024);
    }

    #[test]
    fn a_hit_needs_the_same_owner_and_key() {
        let mut f: Front<u128, u32> = Front::new();
        assert_eq!(f.get(1, 5, &5), None);
        f.put(1, 5, 5, 50);
        assert_eq!(f.get(1, 5, &5), Some(50));
        // Same set, other key: a miss, never the other key's value.
        assert_eq!(f.get(1, 5 + SETS as u64, &6), None);
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
    fn a_set_keeps_its_newest_keys() {
        let mut f: Front<u64, u64> = Front::new();
        // WAYS + 1 keys in one set: the oldest goes, the others stay.
        let bits = |k: u64| 3 + k * SETS as u64;
        for k in 0..=WAYS as u64 {
            f.put(1, bits(k), k, k * 10);
        }
        assert_eq!(f.get(1, bits(0), &0), None);
        for k in 1..=WAYS as u64 {
            assert_eq!(f.get(1, bits(k), &k), Some(k * 10));
        }
        // Putting a key again replaces it in place: nothing else goes.
        f.put(1, bits(2), 2, 21);
        for k in 1..=WAYS as u64 {
            let want = if k == 2 { 21 } else { k * 10 };
            assert_eq!(f.get(1, bits(k), &k), Some(want));
        }
        // Removing one frees a way: the next new key evicts nothing else.
        f.remove(1, bits(3), &3);
        assert_eq!(f.get(1, bits(3), &3), None);
        f.put(1, bits(9), 9, 90);
        for k in [1, 2, 4, 9] {
            assert!(f.get(1, bits(k), &k).is_some(), "key {k} was evicted");
        }
        // Another set is untouched by all of it.
        f.put(1, 4, 100, 1000);
        assert_eq!(f.get(1, 4, &100), Some(1000));
        assert_eq!(f.get(1, bits(9), &9), Some(90));
    }

    /// The load script's 10k-token mode in miniature: 10k keys with
    /// uniform bits, visited round-robin. A direct-mapped array of 16k
    /// slots kept about 54% of them; the sets keep all but those in sets of
    /// five or more (about 4%).
    #[test]
    fn ten_thousand_keys_visited_in_turn_mostly_stay() {
        // SplitMix64: uniform bits from a fixed seed, so the count is exact.
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let keys: Vec<u64> = (0..10_000)
            .map(|_| {
                state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                z ^ (z >> 31)
            })
            .collect();
        let mut f: Front<u64, u64> = Front::new();
        let mut hits = 0;
        for round in 0..3 {
            for &k in &keys {
                match f.get(1, k, &k) {
                    Some(v) => {
                        assert_eq!(v, k, "a hit is the key's own value");
                        if round == 2 {
                            hits += 1;
                        }
                    }
                    None => f.put(1, k, k, k),
                }
            }
        }
        assert!(
            hits > 9_300,
            "{hits} of 10000 keys hit in the third round (expected about 9600)"
        );
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
