//! An index from IP to the entry that holds it, correct while two entries briefly claim
//! the same IP (a pod's IP reused by a new pod before the old one's removal arrives).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

/// IP → entry. The entry put last wins; removing it hands the IP back to the previous
/// holder still present, so a lookup never misses an entry the state still has.
#[derive(Debug)]
pub(super) struct IpIndex<T> {
    current: HashMap<IpAddr, Arc<T>>,
    /// Earlier holders of an IP that is now taken, oldest first. Empty but for conflicts.
    shadowed: HashMap<IpAddr, Vec<Arc<T>>>,
}

impl<T> Default for IpIndex<T> {
    fn default() -> Self {
        Self {
            current: HashMap::new(),
            shadowed: HashMap::new(),
        }
    }
}

impl<T> IpIndex<T> {
    /// The entry holding `ip`.
    pub(super) fn get(&self, ip: &IpAddr) -> Option<&Arc<T>> {
        self.current.get(ip)
    }

    /// `entry` takes `ip`.
    pub(super) fn insert(&mut self, ip: IpAddr, entry: Arc<T>) {
        if let Some(previous) = self.current.insert(ip, entry) {
            self.shadowed.entry(ip).or_default().push(previous);
        }
    }

    /// `entry` (the very `Arc` inserted) lets go of `ip`.
    pub(super) fn remove(&mut self, ip: &IpAddr, entry: &Arc<T>) {
        if self.current.get(ip).is_some_and(|e| Arc::ptr_eq(e, entry)) {
            match self.shadowed.get_mut(ip).and_then(Vec::pop) {
                Some(previous) => {
                    self.current.insert(*ip, previous);
                }
                None => {
                    self.current.remove(ip);
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
}
