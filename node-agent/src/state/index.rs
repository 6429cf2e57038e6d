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
/// holder still present, so a lookup never misses an entry the state still has. The
/// current holders sit in `S`: a map per family ([`ByAddress`], an IPv4 slot 16 bytes
/// rather than an `IpAddr`'s 32), or, for entries with at most one IP per family, tables
/// of the entries themselves ([`ByEntry`], a slot one pointer).
#[derive(Debug)]
pub(super) struct IpIndex<T, S = ByAddress<T>> {
    current: S,
    /// Earlier holders of an IP that is now taken, oldest first. Empty but for conflicts.
    shadowed: HashMap<IpAddr, Vec<Arc<T>>>,
}

impl<T, S: Default> Default for IpIndex<T, S> {
    fn default() -> Self {
        Self {
            current: S::default(),
            shadowed: HashMap::new(),
        }
    }
}

/// Where an [`IpIndex`] keeps each IP's current holder.
pub(super) trait Holders<T> {
    /// The entry holding `ip`.
    fn get(&self, ip: &IpAddr) -> Option<&Arc<T>>;
    /// `entry` (which holds `ip`) takes `ip`; the entry it displaces is returned.
    fn put(&mut self, ip: IpAddr, entry: Arc<T>) -> Option<Arc<T>>;
    /// Nobody holds `ip` any more; its holder is returned.
    fn take(&mut self, ip: &IpAddr) -> Option<Arc<T>>;
    /// How many IPs are held.
    fn len(&self) -> usize;
}

/// IP → holder, a map per family.
#[derive(Debug)]
pub(super) struct ByAddress<T> {
    v4: HashMap<Ipv4Addr, Arc<T>>,
    v6: HashMap<Ipv6Addr, Arc<T>>,
}

impl<T> Default for ByAddress<T> {
    fn default() -> Self {
        Self {
            v4: HashMap::new(),
            v6: HashMap::new(),
        }
    }
}

impl<T> Holders<T> for ByAddress<T> {
    fn get(&self, ip: &IpAddr) -> Option<&Arc<T>> {
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

    fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }
}

/// An entry with at most one IP of each family, which can so be found by it.
pub(super) trait OneIpPerFamily {
    /// Its IPv4 address.
    fn v4(&self) -> Option<Ipv4Addr>;
    /// Its IPv6 address.
    fn v6(&self) -> Option<Ipv6Addr>;
}

/// The holders themselves, a table per family hashed by the holder's own address of
/// that family: a slot is one pointer (9 bytes with its control byte, where an IPv4
/// map's is 17), and a lookup compares the address inside the entry.
#[derive(Debug)]
pub(super) struct ByEntry<T> {
    v4: HashTable<Arc<T>>,
    v6: HashTable<Arc<T>>,
    hasher: RandomState,
}

impl<T> Default for ByEntry<T> {
    fn default() -> Self {
        Self {
            v4: HashTable::new(),
            v6: HashTable::new(),
            hasher: RandomState::new(),
        }
    }
}

impl<T: OneIpPerFamily> ByEntry<T> {
    /// The entry's address of `ip`'s family is `ip`.
    fn holds(e: &T, ip: &IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => e.v4() == Some(*a),
            IpAddr::V6(a) => e.v6() == Some(*a),
        }
    }

    /// The table of `ip`'s family, and how to hash one of its entries (by that family's
    /// address, which every entry of the table has).
    #[allow(clippy::type_complexity)]
    fn table(&mut self, ip: &IpAddr) -> (&mut HashTable<Arc<T>>, &RandomState, fn(&T) -> IpAddr) {
        match ip {
            IpAddr::V4(_) => (&mut self.v4, &self.hasher, |e| {
                IpAddr::V4(e.v4().expect("in the IPv4 table"))
            }),
            IpAddr::V6(_) => (&mut self.v6, &self.hasher, |e| {
                IpAddr::V6(e.v6().expect("in the IPv6 table"))
            }),
        }
    }
}

impl<T: OneIpPerFamily> Holders<T> for ByEntry<T> {
    fn get(&self, ip: &IpAddr) -> Option<&Arc<T>> {
        let table = if ip.is_ipv4() { &self.v4 } else { &self.v6 };
        table.find(self.hasher.hash_one(ip), |e| Self::holds(e, ip))
    }

    fn put(&mut self, ip: IpAddr, entry: Arc<T>) -> Option<Arc<T>> {
        assert!(
            Self::holds(&entry, &ip),
            "an entry is indexed by its own IP"
        );
        let (table, hasher, key) = self.table(&ip);
        match table.entry(
            hasher.hash_one(ip),
            |e| Self::holds(e, &ip),
            |e| hasher.hash_one(key(e)),
        ) {
            Entry::Occupied(mut o) => Some(std::mem::replace(o.get_mut(), entry)),
            Entry::Vacant(v) => {
                v.insert(entry);
                None
            }
        }
    }

    fn take(&mut self, ip: &IpAddr) -> Option<Arc<T>> {
        let hash = self.hasher.hash_one(ip);
        let (table, _, _) = self.table(ip);
        let found = table.find_entry(hash, |e| Self::holds(e, ip));
        found.ok().map(|o| o.remove().0)
    }

    fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }
}

impl<T, S: Holders<T>> IpIndex<T, S> {
    /// The entry holding `ip`.
    pub(super) fn get(&self, ip: &IpAddr) -> Option<&Arc<T>> {
        self.current.get(ip)
    }

    /// `entry` takes `ip` (one of its own).
    pub(super) fn insert(&mut self, ip: IpAddr, entry: Arc<T>) {
        if let Some(previous) = self.current.put(ip, entry) {
            self.shadowed.entry(ip).or_default().push(previous);
        }
    }

    /// `entry` (the very `Arc` inserted) lets go of `ip`.
    pub(super) fn remove(&mut self, ip: &IpAddr, entry: &Arc<T>) {
        if self.get(ip).is_some_and(|e| Arc::ptr_eq(e, entry)) {
            match self.shadowed.get_mut(ip).and_then(Vec::pop) {
                Some(previous) => {
                    self.current.put(*ip, previous);
                }
                None => {
                    self.current.take(ip);
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
            self.current.len(),
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
        let mut index: IpIndex<_> = IpIndex::default();
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
        let mut index: IpIndex<_> = IpIndex::default();
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
        let mut index: IpIndex<_> = IpIndex::default();
        let a = Arc::new("a");
        index.insert(v4, a.clone());
        index.insert(v6, a.clone());
        assert_eq!(index.len(), (2, 0));
        assert!(index.get(&"10.0.0.2".parse().unwrap()).is_none());
        index.remove(&v6, &a);
        assert!(index.get(&v6).is_none() && index.get(&v4).is_some());
    }

    /// An entry of a test, with at most one address per family.
    #[derive(Debug)]
    struct Pod(Option<Ipv4Addr>, Option<Ipv6Addr>);
    impl OneIpPerFamily for Pod {
        fn v4(&self) -> Option<Ipv4Addr> {
            self.0
        }
        fn v6(&self) -> Option<Ipv6Addr> {
            self.1
        }
    }

    #[test]
    fn entries_found_by_their_own_ips_behave_as_a_map_by_address() {
        // The same random puts and removals on both kinds of index: every IP of the pool
        // finds the very same entry (or none) in both, conflicts included.
        let pool4: Vec<Ipv4Addr> = (0..6).map(|i| Ipv4Addr::new(10, 0, 0, i)).collect();
        let pool6: Vec<Ipv6Addr> = (0..6)
            .map(|i| Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, i))
            .collect();
        let mut by_entry: IpIndex<Pod, ByEntry<Pod>> = IpIndex::default();
        let mut by_address: IpIndex<Pod> = IpIndex::default();
        let mut live: Vec<Arc<Pod>> = Vec::new();
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for round in 0..3000u32 {
            if live.is_empty() || next(3) != 0 {
                let v4 = (next(4) != 0).then(|| pool4[next(6) as usize]);
                let v6 = (v4.is_none() || next(3) == 0).then(|| pool6[next(6) as usize]);
                let pod = Arc::new(Pod(v4, v6));
                for ip in v4.map(IpAddr::V4).into_iter().chain(v6.map(IpAddr::V6)) {
                    by_entry.insert(ip, pod.clone());
                    by_address.insert(ip, pod.clone());
                }
                live.push(pod);
            } else {
                let pod = live.swap_remove(next(live.len() as u64) as usize);
                for ip in pod
                    .0
                    .map(IpAddr::V4)
                    .into_iter()
                    .chain(pod.1.map(IpAddr::V6))
                {
                    by_entry.remove(&ip, &pod);
                    by_address.remove(&ip, &pod);
                }
            }
            for ip in pool4
                .iter()
                .map(|a| IpAddr::V4(*a))
                .chain(pool6.iter().map(|a| IpAddr::V6(*a)))
            {
                let (a, b) = (by_entry.get(&ip), by_address.get(&ip));
                assert!(
                    match (a, b) {
                        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                        (None, None) => true,
                        _ => false,
                    },
                    "round {round}: {ip} finds {a:?} by entry, {b:?} by address"
                );
                if let Some(a) = a {
                    assert!(
                        live.iter().any(|p| Arc::ptr_eq(p, a)),
                        "a removed entry is found"
                    );
                }
            }
            assert_eq!(by_entry.len(), by_address.len());
        }
    }

    #[test]
    #[should_panic(expected = "indexed by its own IP")]
    fn an_entry_cannot_be_indexed_by_an_ip_it_does_not_hold() {
        let mut index: IpIndex<Pod, ByEntry<Pod>> = IpIndex::default();
        let pod = Arc::new(Pod(Some(Ipv4Addr::new(10, 0, 0, 1)), None));
        index.insert("10.0.0.2".parse().unwrap(), pod);
    }
}
