//! The state's indexes, made for a mesh of many workloads held by every agent: an index
//! from IP to the entry that holds it, correct while two entries briefly claim the same
//! IP (a pod's IP reused by a new pod before the old one's removal arrives); and a table
//! of entries by their own key (no second copy of the key).

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use hashbrown::HashTable;
use hashbrown::hash_table::Entry;

/// IP → entry. The entry put last wins; removing it hands the IP back to the previous
/// holder still present, so a lookup never misses an entry the state still has. One map
/// per family, so an IPv4 slot is 16 bytes rather than an `IpAddr`'s 32.
#[derive(Debug)]
pub(super) struct IpIndex<T> {
    v4: HashMap<Ipv4Addr, Arc<T>>,
    v6: HashMap<Ipv6Addr, Arc<T>>,
    /// Earlier holders of an IP that is now taken, oldest first. Empty but for conflicts.
    shadowed: HashMap<IpAddr, Vec<Arc<T>>>,
}

impl<T> Default for IpIndex<T> {
    fn default() -> Self {
        Self {
            v4: HashMap::new(),
            v6: HashMap::new(),
            shadowed: HashMap::new(),
        }
    }
}

impl<T> IpIndex<T> {
    /// The entry holding `ip`.
    pub(super) fn get(&self, ip: &IpAddr) -> Option<&Arc<T>> {
        match ip {
            IpAddr::V4(a) => self.v4.get(a),
            IpAddr::V6(a) => self.v6.get(a),
        }
    }

    fn put(&mut self, ip: IpAddr, entry: Arc<T>) -> Option<Arc<T>> {
        match ip {
            IpAddr::V4(a) => self.v4.insert(a, entry),
            IpAddr::V6(a) => self.v6.insert(a, entry),
        }
    }

    fn take(&mut self, ip: &IpAddr) -> Option<Arc<T>> {
        match ip {
            IpAddr::V4(a) => self.v4.remove(a),
            IpAddr::V6(a) => self.v6.remove(a),
        }
    }

    /// `entry` takes `ip`.
    pub(super) fn insert(&mut self, ip: IpAddr, entry: Arc<T>) {
        if let Some(previous) = self.put(ip, entry) {
            self.shadowed.entry(ip).or_default().push(previous);
        }
    }

    /// `entry` (the very `Arc` inserted) lets go of `ip`.
    pub(super) fn remove(&mut self, ip: &IpAddr, entry: &Arc<T>) {
        if self.get(ip).is_some_and(|e| Arc::ptr_eq(e, entry)) {
            match self.shadowed.get_mut(ip).and_then(Vec::pop) {
                Some(previous) => {
                    self.put(*ip, previous);
                }
                None => {
                    self.take(ip);
                }
            }
        } else if let Some(list) = self.shadowed.get_mut(ip) {
            list.retain(|e| !Arc::ptr_eq(e, entry));
        }
        if self.shadowed.get(ip).is_some_and(Vec::is_empty) {
            self.shadowed.remove(ip);
        }
    }

    /// How many IPs are indexed, and how many entries wait behind another.
    pub(super) fn len(&self) -> (usize, usize) {
        (
            self.v4.len() + self.v6.len(),
            self.shadowed.values().map(Vec::len).sum(),
        )
    }
}

/// What an entry of a [`ByKey`] table is found by.
pub(super) trait Keyed {
    /// The entry's key, part of the entry itself.
    fn key(&self) -> &str;
}

/// Entries by their key, where the key is a field of the entry: a slot is one pointer,
/// where a `HashMap<Arc<str>, Arc<T>>` would hold the key a second time beside it.
#[derive(Debug)]
pub(super) struct ByKey<T> {
    table: HashTable<Arc<T>>,
    hasher: RandomState,
}

impl<T> Default for ByKey<T> {
    fn default() -> Self {
        Self {
            table: HashTable::new(),
            hasher: RandomState::new(),
        }
    }
}

impl<T: Keyed> ByKey<T> {
    fn hash(&self, key: &str) -> u64 {
        self.hasher.hash_one(key)
    }

    /// The entry with this key.
    pub(super) fn get(&self, key: &str) -> Option<&Arc<T>> {
        self.table.find(self.hash(key), |e| e.key() == key)
    }

    /// Is there an entry with this key?
    pub(super) fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// Adds `entry`, returning the one it replaces.
    pub(super) fn insert(&mut self, entry: Arc<T>) -> Option<Arc<T>> {
        let hasher = &self.hasher;
        match self.table.entry(
            hasher.hash_one(entry.key()),
            |e| e.key() == entry.key(),
            |e| hasher.hash_one(e.key()),
        ) {
            Entry::Occupied(mut o) => Some(std::mem::replace(o.get_mut(), entry)),
            Entry::Vacant(v) => {
                v.insert(entry);
                None
            }
        }
    }

    /// Removes the entry with this key.
    pub(super) fn remove(&mut self, key: &str) -> Option<Arc<T>> {
        let found = self.table.find_entry(self.hash(key), |e| e.key() == key);
        found.ok().map(|o| o.remove().0)
    }

    /// Every entry, in no order.
    pub(super) fn values(&self) -> impl Iterator<Item = &Arc<T>> {
        self.table.iter()
    }

    /// How many entries.
    pub(super) fn len(&self) -> usize {
        self.table.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_holder_wins_and_removing_it_restores_the_previous_one() {
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let (a, b, c) = (Arc::new("a"), Arc::new("b"), Arc::new("c"));
        let mut index = IpIndex::default();
        index.insert(ip, a.clone());
        index.insert(ip, b.clone());
        index.insert(ip, c.clone());
        assert_eq!(**index.get(&ip).unwrap(), "c");
        // A shadowed holder leaves without disturbing the current one.
        index.remove(&ip, &b);
        assert_eq!(**index.get(&ip).unwrap(), "c");
        index.remove(&ip, &c);
        assert_eq!(**index.get(&ip).unwrap(), "a");
        index.remove(&ip, &a);
        assert!(index.get(&ip).is_none());
        assert_eq!(index.len(), (0, 0));
    }

    #[test]
    fn removing_an_entry_that_never_held_the_ip_changes_nothing() {
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let (a, stranger) = (Arc::new(1), Arc::new(1));
        let mut index = IpIndex::default();
        index.insert(ip, a.clone());
        index.remove(&ip, &stranger);
        assert!(Arc::ptr_eq(index.get(&ip).unwrap(), &a));
    }

    struct Entry(String, u32);
    impl Keyed for Entry {
        fn key(&self) -> &str {
            &self.0
        }
    }

    #[test]
    fn a_table_by_key_replaces_finds_and_removes_by_the_entrys_own_key() {
        let mut t = ByKey::default();
        assert!(t.insert(Arc::new(Entry("a".into(), 1))).is_none());
        assert!(t.insert(Arc::new(Entry("b".into(), 2))).is_none());
        let old = t.insert(Arc::new(Entry("a".into(), 3))).unwrap();
        assert_eq!(old.1, 1);
        assert_eq!(t.len(), 2);
        assert_eq!(t.get("a").unwrap().1, 3);
        assert!(t.contains_key("b") && !t.contains_key("c"));
        assert_eq!(t.remove("b").unwrap().1, 2);
        assert!(t.remove("b").is_none() && t.get("b").is_none());
        assert_eq!(t.values().map(|e| e.1).collect::<Vec<_>>(), [3]);
    }

    #[test]
    fn ips_of_each_family_sit_in_their_own_map() {
        let (v4, v6): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "fd00::1".parse().unwrap());
        let mut index = IpIndex::default();
        let a = Arc::new("a");
        index.insert(v4, a.clone());
        index.insert(v6, a.clone());
        assert_eq!(index.len(), (2, 0));
        assert!(index.get(&"10.0.0.2".parse().unwrap()).is_none());
        index.remove(&v6, &a);
        assert!(index.get(&v6).is_none() && index.get(&v4).is_some());
    }
}
