//! One shared copy of what many workloads hold alike: placements (node, waypoint and
//! flags), node and waypoint names, profiles (identity and canonical names), identities. The xDS decoder looks a value up by the borrowed text it
//! just decoded and allocates only a value it has not seen, so 10k workloads of 50 nodes
//! hold 50 node names, and decoding a known value allocates nothing that is then freed
//! among what is kept (which would fragment the heap).

use std::hash::{BuildHasher, Hash, RandomState};
use std::sync::Arc;

use ambit_identity::Identity;
use hashbrown::HashTable;

use super::{Canonical, MtlsMode, Placement, PlacementKey, Profile, ProfileKey};

/// A value that can be shared: it says how many hold it and hashes as its lookup key.
pub trait Shared: Clone {
    /// How many hold it (the interner's own copy included).
    fn holders(&self) -> usize;
    /// Its hash, computed as the lookup key's.
    fn hash_with(&self, s: &RandomState) -> u64;
}

impl Shared for Arc<str> {
    fn holders(&self) -> usize {
        Arc::strong_count(self)
    }
    fn hash_with(&self, s: &RandomState) -> u64 {
        s.hash_one(&**self)
    }
}

impl Shared for Arc<Identity> {
    fn holders(&self) -> usize {
        Arc::strong_count(self)
    }
    fn hash_with(&self, s: &RandomState) -> u64 {
        s.hash_one(self.as_str())
    }
}

impl Shared for Arc<Profile> {
    fn holders(&self) -> usize {
        Arc::strong_count(self)
    }
    fn hash_with(&self, s: &RandomState) -> u64 {
        s.hash_one(self.key())
    }
}

impl Shared for Arc<Placement> {
    fn holders(&self) -> usize {
        Arc::strong_count(self)
    }
    fn hash_with(&self, s: &RandomState) -> u64 {
        s.hash_one(self.key())
    }
}

/// Shared values of one kind. A value stays while anyone else holds it: [`sweep`]
/// drops the ones only the interner still holds, once enough were handed out since the
/// last sweep that the pass pays (amortized O(1) per value handed out).
///
/// [`sweep`]: Interner::sweep
#[derive(Debug)]
pub struct Interner<E> {
    table: HashTable<E>,
    hasher: RandomState,
    /// Values handed out since the last sweep.
    since_sweep: usize,
    /// How many the last sweep kept.
    kept: usize,
}

impl<E> Default for Interner<E> {
    fn default() -> Self {
        Self {
            table: HashTable::new(),
            hasher: RandomState::new(),
            since_sweep: 0,
            kept: 0,
        }
    }
}

impl<E: Shared> Interner<E> {
    /// The shared value whose key is `key` (`is` tells it apart), made by `make` the
    /// first time; `make`'s error is returned as it is and nothing is kept.
    pub fn get_or_try<K: Hash + ?Sized, X>(
        &mut self,
        key: &K,
        is: impl Fn(&E) -> bool,
        make: impl FnOnce() -> Result<E, X>,
    ) -> Result<E, X> {
        self.since_sweep += 1;
        let hash = self.hasher.hash_one(key);
        if let Some(v) = self.table.find(hash, &is) {
            return Ok(v.clone());
        }
        let v = make()?;
        let hasher = &self.hasher;
        self.table
            .insert_unique(hash, v.clone(), |e| e.hash_with(hasher));
        Ok(v)
    }

    /// [`get_or_try`](Self::get_or_try) for a `make` that cannot fail.
    pub fn get_or<K: Hash + ?Sized>(
        &mut self,
        key: &K,
        is: impl Fn(&E) -> bool,
        make: impl FnOnce() -> E,
    ) -> E {
        match self.get_or_try(key, is, || Ok::<_, std::convert::Infallible>(make())) {
            Ok(v) => v,
        }
    }

    /// Drops the values nobody else holds, when it pays.
    pub fn sweep(&mut self) {
        if self.since_sweep > self.kept.max(16) {
            self.table.retain(|v| v.holders() > 1);
            self.since_sweep = 0;
            self.kept = self.table.len();
        }
    }

    /// How many values are held.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// None.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }
}

impl Interner<Arc<str>> {
    /// The shared copy of `s`.
    pub fn str(&mut self, s: &str) -> Arc<str> {
        self.get_or(s, |e| **e == *s, || s.into())
    }
}

/// The interners of the xDS decoder.
#[derive(Debug, Default)]
pub struct Interners {
    /// Node and waypoint names.
    pub strings: Interner<Arc<str>>,
    /// Identities, by their URI.
    pub identities: Interner<Arc<Identity>>,
    /// Profiles, by their identity and four canonical names.
    pub profiles: Interner<Arc<Profile>>,
    /// Placements, by their fields.
    pub placements: Interner<Arc<Placement>>,
}

impl Interners {
    /// The shared identity of `uri`, parsed the first time.
    pub fn identity(&mut self, uri: &str) -> Result<Arc<Identity>, ambit_identity::IdentityError> {
        self.identities.get_or_try(
            uri,
            |e| e.as_str() == uri,
            || Identity::parse(uri).map(Arc::new),
        )
    }

    /// The shared profile of a workload `name` of `identity` whose labels `label` looks
    /// up (its canonical names by Istio's rules).
    pub fn profile<'a>(
        &mut self,
        identity: &Arc<Identity>,
        name: &'a str,
        label: impl Fn(&str) -> Option<&'a str>,
    ) -> Arc<Profile> {
        let key: ProfileKey<'_> = (identity.as_str(), Canonical::names_of(name, label));
        self.profiles.get_or(
            &key,
            |e| e.key() == key,
            || {
                Arc::new(Profile {
                    identity: identity.clone(),
                    canonical: Canonical::from_names(key.1),
                })
            },
        )
    }

    /// The shared placement on `node` behind `waypoint` (names shared too).
    pub fn placement(
        &mut self,
        node: &str,
        waypoint: Option<&str>,
        enrolled: bool,
        native_tunnel: bool,
        mtls: MtlsMode,
    ) -> Arc<Placement> {
        let key: PlacementKey<'_> = (node, waypoint, enrolled, native_tunnel, mtls);
        let strings = &mut self.strings;
        self.placements.get_or(
            &key,
            |e| e.key() == key,
            || {
                Arc::new(Placement {
                    node: strings.str(node),
                    waypoint: waypoint.map(|w| strings.str(w)),
                    enrolled,
                    native_tunnel,
                    mtls,
                })
            },
        )
    }

    /// Lets go of what no workload holds any more (when it pays).
    pub fn sweep(&mut self) {
        // Placements and profiles first: they hold names and identities.
        self.placements.sweep();
        self.profiles.sweep();
        self.strings.sweep();
        self.identities.sweep();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interner_hands_out_one_copy_and_drops_it_once_nobody_holds_it() {
        let mut i = Interner::default();
        let a = i.str("node-1");
        let b = i.str("node-1");
        assert!(Arc::ptr_eq(&a, &b));
        let c = i.str("node-2");
        drop((b, c));
        // Not yet worth a pass.
        i.sweep();
        assert_eq!(i.len(), 2);
        for _ in 0..16 {
            i.str("node-1");
        }
        i.sweep();
        assert_eq!(i.len(), 1);
        assert!(Arc::ptr_eq(&a, &i.str("node-1")));
    }

    #[test]
    fn identities_are_parsed_once_and_bad_ones_are_refused_and_not_kept() {
        let mut i = Interners::default();
        let a = i.identity("spiffe://td/ns/a/sa/b").unwrap();
        assert!(Arc::ptr_eq(
            &a,
            &i.identity("spiffe://td/ns/a/sa/b").unwrap()
        ));
        assert_eq!((a.namespace(), a.service_account()), ("a", "b"));
        assert!(i.identity("spiffe://td/ns/a").is_err());
        assert!(i.identity("spiffe://td/ns/a").is_err());
        assert_eq!(i.identities.len(), 1);
    }

    #[test]
    fn profiles_are_shared_by_workloads_of_one_identity_and_labels() {
        let mut i = Interners::default();
        let labels: ambit_policy::Labels = [("app".to_string(), "web".to_string())].into();
        let label = |k: &str| labels.get(k).map(String::as_str);
        let id = i.identity("spiffe://td/ns/a/sa/web").unwrap();
        let (a, b) = (i.profile(&id, "a-1", label), i.profile(&id, "a-2", label));
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(a.canonical, Canonical::derive("a-1", &labels));
        assert!(Arc::ptr_eq(&a.identity, &id));
        // Another identity with the same labels is another profile.
        let other = i.identity("spiffe://td/ns/a/sa/other").unwrap();
        let c = i.profile(&other, "a-1", label);
        assert!(!Arc::ptr_eq(&a, &c) && *c.identity == *other);
        let (d, e) = (
            i.profile(&id, "pod-1", |_| None),
            i.profile(&id, "pod-2", |_| None),
        );
        assert!(
            !Arc::ptr_eq(&d, &e),
            "unlabeled pods are named by themselves"
        );
        assert_eq!(&*d.canonical.service, "pod-1");
        // Unheld profiles go at a sweep, and then identities only they held.
        drop((b, c, d, e, other));
        for _ in 0..32 {
            i.profile(&id, "a-3", label);
            i.identity("spiffe://td/ns/a/sa/web").unwrap();
        }
        i.sweep();
        assert_eq!(i.profiles.len(), 1, "only `a` is held");
        assert_eq!(i.identities.len(), 1);
    }

    #[test]
    fn placements_are_shared_by_their_fields_and_share_their_names() {
        let mut i = Interners::default();
        let strict = MtlsMode::Strict;
        let a = i.placement("n1", Some("wp"), true, false, strict);
        let b = i.placement("n1", Some("wp"), true, false, strict);
        assert!(Arc::ptr_eq(&a, &b));
        // Any field apart is another placement, holding the same names.
        for other in [
            i.placement("n1", None, true, false, strict),
            i.placement("n1", Some("wp"), false, false, strict),
            i.placement("n1", Some("wp"), true, true, strict),
            i.placement("n1", Some("wp"), true, false, MtlsMode::Permissive),
        ] {
            assert!(!Arc::ptr_eq(&a, &other) && *a != *other);
            assert!(Arc::ptr_eq(&a.node, &other.node));
        }
        assert!(Arc::ptr_eq(
            a.waypoint.as_ref().unwrap(),
            i.placement("n2", Some("wp"), true, false, strict)
                .waypoint
                .as_ref()
                .unwrap()
        ));
        // Unheld placements go at a sweep, and then their names.
        drop(b);
        for _ in 0..32 {
            i.placement("n3", None, true, false, strict);
        }
        i.sweep();
        i.sweep();
        assert_eq!(i.placements.len(), 1, "only `a` is held");
        assert!(Arc::ptr_eq(
            &a,
            &i.placement("n1", Some("wp"), true, false, strict)
        ));
    }
}
