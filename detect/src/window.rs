//! Bounded state: [`Table`], a map that evicts its least recently touched key, and [`Recent`], a sliding window of distinct values.
//!
//! Every table the detectors keep is one of these, so no input — 100,000 identities, a
//! scanner walking every address — grows memory past `max_keys` entries per table.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::mem::size_of;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::time::{Span, Time};

/// Heap bytes a value holds beyond its own size; an estimate, for [`Table::approx_bytes`].
pub trait HeapSize {
    fn heap_bytes(&self) -> usize;
}

impl HeapSize for String {
    fn heap_bytes(&self) -> usize {
        self.capacity()
    }
}

impl<T: HeapSize> HeapSize for Vec<T> {
    fn heap_bytes(&self) -> usize {
        self.capacity() * size_of::<T>() + self.iter().map(HeapSize::heap_bytes).sum::<usize>()
    }
}

impl<A: HeapSize, B: HeapSize> HeapSize for (A, B) {
    fn heap_bytes(&self) -> usize {
        self.0.heap_bytes() + self.1.heap_bytes()
    }
}

impl HeapSize for Time {
    fn heap_bytes(&self) -> usize {
        0
    }
}

/// A map with at most `cap` keys. Touching a key makes it the newest; inserting into a
/// full table evicts the oldest. Order is by touch, not by event time, so a clock that
/// goes backwards cannot make a fresh key look old.
#[derive(Debug, Clone)]
pub struct Table<K, V> {
    cap: usize,
    map: HashMap<K, (V, u64)>,
    order: BTreeMap<u64, K>,
    next: u64,
    evicted: u64,
}

impl<K: Hash + Eq + Clone, V> Table<K, V> {
    pub fn new(cap: usize) -> Self {
        Table {
            cap: cap.max(1),
            map: HashMap::new(),
            order: BTreeMap::new(),
            next: 0,
            evicted: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Keys evicted for room since this table was made (not persisted).
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    pub fn get(&self, key: &K) -> Option<&V> {
        self.map.get(key).map(|(v, _)| v)
    }

    /// The value for `key`, made the newest; `make` builds it when absent (evicting the
    /// oldest key first when the table is full).
    pub fn entry(&mut self, key: K, make: impl FnOnce() -> V) -> &mut V {
        let stamp = self.touch(&key);
        let slot = self.map.entry(key).or_insert_with(|| (make(), stamp));
        slot.1 = stamp;
        &mut slot.0
    }

    /// Sets `key` to `value`, made the newest.
    pub fn insert(&mut self, key: K, value: V) {
        let stamp = self.touch(&key);
        self.map.insert(key, (value, stamp));
    }

    /// A new stamp for `key` in the order; room made when `key` is new and the table full.
    fn touch(&mut self, key: &K) -> u64 {
        let stamp = self.next;
        self.next += 1;
        if let Some((_, old)) = self.map.get(key) {
            // Re-stamp with the key the order already holds: no clone on the hot path.
            if let Some(k) = self.order.remove(old) {
                self.order.insert(stamp, k);
                return stamp;
            }
        } else {
            while self.map.len() >= self.cap {
                let Some((_, oldest)) = self.order.pop_first() else {
                    break;
                };
                self.map.remove(&oldest);
                self.evicted += 1;
            }
        }
        self.order.insert(stamp, key.clone());
        stamp
    }

    pub fn remove(&mut self, key: &K) -> Option<V> {
        let (v, stamp) = self.map.remove(key)?;
        self.order.remove(&stamp);
        Some(v)
    }

    /// Entries oldest first.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.order
            .values()
            .filter_map(|k| self.map.get(k).map(|(v, _)| (k, v)))
    }
}

impl<K: Hash + Eq + Clone + HeapSize, V: HeapSize> Table<K, V> {
    /// An estimate of the memory held: per entry the key twice (map and order), the value,
    /// the stamps and the hash table's and B-tree's overhead.
    pub fn approx_bytes(&self) -> usize {
        // hashbrown: one control byte per bucket at a load of 7/8; B-tree: roughly 1.5
        // times the stored (stamp, key) pairs for partly filled nodes.
        let slot = size_of::<K>() + size_of::<(V, u64)>();
        let map = self.map.capacity() * (slot + 1) * 8 / 7;
        let order = self.order.len() * (size_of::<u64>() + size_of::<K>()) * 3 / 2;
        let heap: usize = self
            .map
            .iter()
            .map(|(k, (v, _))| 2 * k.heap_bytes() + v.heap_bytes())
            .sum();
        size_of::<Self>() + map + order + heap
    }
}

/// Serialized as its entries, oldest first, so a reload keeps the eviction order.
impl<K: Hash + Eq + Clone + Serialize, V: Serialize> Serialize for Table<K, V> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

impl<'de, K, V> Deserialize<'de> for Table<K, V>
where
    K: Hash + Eq + Clone + DeserializeOwned,
    V: DeserializeOwned,
{
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let entries = Vec::<(K, V)>::deserialize(d)?;
        // The cap is the caller's ([`Table::with_cap`] after loading), not the file's.
        let mut table = Table::new(usize::MAX);
        for (k, v) in entries {
            table.insert(k, v);
        }
        Ok(table)
    }
}

impl<K: Hash + Eq + Clone, V> Table<K, V> {
    /// Applies the configured cap after loading, evicting the oldest beyond it.
    pub fn with_cap(mut self, cap: usize) -> Self {
        self.cap = cap.max(1);
        while self.map.len() > self.cap {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            self.map.remove(&oldest);
        }
        self
    }
}

/// Distinct values seen within a window, each with the last time it was seen; at most
/// `limit` kept (the oldest dropped), which is all a threshold of `limit` needs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recent(pub Vec<(String, Time)>);

impl Recent {
    /// Records `value` at `now`, forgets what is older than `window`, and returns how many
    /// distinct values remain.
    pub fn note(&mut self, value: &str, now: Time, window: Span, limit: usize) -> usize {
        self.prune(now, window);
        match self.0.iter_mut().find(|(v, _)| v == value) {
            Some(seen) => seen.1 = seen.1.max(now),
            None => {
                if self.0.len() >= limit.max(1) {
                    self.0.remove(0);
                }
                push_exact(&mut self.0, (value.to_owned(), now));
            }
        }
        self.0.len()
    }

    /// Forgets values last seen more than `window` before `now`.
    pub fn prune(&mut self, now: Time, window: Span) {
        let since = now.minus(window);
        self.0.retain(|(_, t)| *t > since);
    }

    pub fn values(&self) -> Vec<String> {
        let mut v: Vec<String> = self.0.iter().map(|(s, _)| s.clone()).collect();
        v.sort();
        v
    }

    /// Earliest time still in the window.
    pub fn since(&self) -> Option<Time> {
        self.0.iter().map(|(_, t)| *t).min()
    }
}

/// Pushes growing the capacity by one: these lists hold a handful of entries in each of
/// hundreds of thousands of keys, where doubling would waste more than it saves in copies.
pub fn push_exact<T>(v: &mut Vec<T>, item: T) {
    if v.len() == v.capacity() {
        v.reserve_exact(1);
    }
    v.push(item);
}

impl HeapSize for Recent {
    fn heap_bytes(&self) -> usize {
        self.0.heap_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_table_evicts_the_least_recently_touched_key() {
        let mut t: Table<String, u32> = Table::new(2);
        *t.entry("a".into(), || 0) += 1;
        *t.entry("b".into(), || 0) += 1;
        *t.entry("a".into(), || 0) += 1;
        *t.entry("c".into(), || 0) += 1;
        assert_eq!(t.len(), 2);
        assert_eq!(t.get(&"a".into()), Some(&2));
        assert_eq!(t.get(&"b".into()), None, "b was the oldest");
        assert_eq!(t.evicted(), 1);
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(json, r#"[["a",2],["c",1]]"#);
        let back: Table<String, u32> = serde_json::from_str::<Table<String, u32>>(&json)
            .unwrap()
            .with_cap(1);
        assert_eq!(back.iter().collect::<Vec<_>>(), vec![(&"c".to_owned(), &1)]);
    }

    #[test]
    fn recent_counts_distinct_values_inside_the_window() {
        let mut r = Recent::default();
        let w = Span::minutes(10);
        assert_eq!(r.note("db1", Time(0), w, 5), 1);
        assert_eq!(r.note("db1", Time(1000), w, 5), 1);
        assert_eq!(r.note("db2", Time(2000), w, 5), 2);
        assert_eq!(
            r.note("db3", Time(Span::minutes(10).0 + 1500), w, 5),
            2,
            "db1 aged out"
        );
    }
}
