//! Resource versions, as a handler keeps them for the client's reconnects
//! (`initial_resource_versions`: what it holds, so that the server resends only what
//! changed).
//!
//! The handler keeps them, not the client: a handler already holds each resource by its
//! name, so it can keep the version beside it (the node agent's store keeps a workload's
//! in the workload itself, 8 bytes) instead of the client holding every name a second
//! time. [`Versions`] is the bookkeeping for a handler that has no better place.

use std::sync::Arc;

/// A resource's version. Versions are opaque strings; Ambit's control plane sends 16 hex
/// digits (a hash), kept here as the number itself so that an agent holding 10k
/// workloads does not hold 10k more strings. Anything else is kept as it came.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Version {
    /// Exactly 16 lowercase hex digits.
    Hex(u64),
    /// Any other string (boxed twice so that a version is 16 bytes, not 24).
    Text(Box<Box<str>>),
}

impl Version {
    /// The version `v`, as compact as it allows.
    pub fn new(v: &str) -> Self {
        if v.len() == 16
            && v.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            && let Ok(n) = u64::from_str_radix(v, 16)
        {
            return Self::Hex(n);
        }
        Self::Text(Box::new(v.into()))
    }

    /// The number, if it is 16 hex digits.
    pub fn hex(&self) -> Option<u64> {
        match self {
            Self::Hex(n) => Some(*n),
            Self::Text(_) => None,
        }
    }
}

/// Exactly the string it was made from.
impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Hex(n) => write!(f, "{n:016x}"),
            Self::Text(t) => f.write_str(t),
        }
    }
}

/// Name → version, for one type: a vector sorted by name, 32 bytes a name. (A hash map's
/// slots come in powers of two: at 10k names it was 55 bytes a name.) An update of a few
/// names is inserted by binary search; a large one is appended and merged by one sort.
#[derive(Debug, Default)]
pub struct Versions(Vec<(Arc<str>, Version)>);

/// Up to this many names, a change is made one binary search at a time.
const FEW: usize = 32;

impl Versions {
    /// How many names.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// No names at all.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Every name and its version, by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Version)> {
        self.0.iter().map(|(n, v)| (&**n, v))
    }

    /// The version of `name`.
    pub fn get(&self, name: &str) -> Option<&Version> {
        self.find(name).ok().map(|i| &self.0[i].1)
    }

    fn find(&self, name: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(n, _)| (**n).cmp(name))
    }

    /// Records `versions` (a name given twice keeps the last).
    pub fn upsert(&mut self, versions: impl IntoIterator<Item = (Arc<str>, Version)>) {
        let versions: Vec<_> = versions.into_iter().collect();
        if versions.len() <= FEW {
            for (name, v) in versions {
                match self.find(&name) {
                    Ok(i) => self.0[i].1 = v,
                    Err(i) => self.0.insert(i, (name, v)),
                }
            }
            return;
        }
        self.0.extend(versions);
        // Stable: of one name's entries, the older comes first; the newer is kept.
        self.0.sort_by(|a, b| a.0.cmp(&b.0));
        self.0.dedup_by(|later, kept| {
            let same = later.0 == kept.0;
            if same {
                std::mem::swap(later, kept);
            }
            same
        });
    }

    /// Applies one update: forgets `removed`, then records `updated`.
    pub fn update(
        &mut self,
        removed: &[String],
        updated: impl IntoIterator<Item = (Arc<str>, Version)>,
    ) {
        self.remove(removed);
        self.upsert(updated);
    }

    /// Forgets `names` (those it has).
    pub fn remove(&mut self, names: &[String]) {
        if names.len() <= FEW {
            for n in names {
                if let Ok(i) = self.find(n) {
                    self.0.remove(i);
                }
            }
        } else {
            let gone: std::collections::HashSet<&str> = names.iter().map(String::as_str).collect();
            self.0.retain(|(n, _)| !gone.contains(&**n));
        }
        if self.0.capacity() > 2 * self.0.len() + FEW {
            self.0.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Version, Versions};
    use std::sync::Arc;

    #[test]
    fn versions_behave_as_a_map_whatever_the_batch_sizes() {
        use std::collections::BTreeMap;
        let mut known = Versions::default();
        let mut model: BTreeMap<String, String> = BTreeMap::new();
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for round in 0..300 {
            // Batches of 1 to 200 names out of 400: both the few and the many path, with
            // names repeated inside a batch.
            let size = 1 + next(if round % 3 == 0 { 200 } else { 8 }) as usize;
            let batch: Vec<(String, String)> = (0..size)
                .map(|_| {
                    let v = if next(4) == 0 {
                        format!("v{}", next(9))
                    } else {
                        format!("{:016x}", next(u64::MAX))
                    };
                    (format!("ns/w-{}", next(400)), v)
                })
                .collect();
            if next(3) == 0 {
                let names: Vec<String> = batch.into_iter().map(|(n, _)| n).collect();
                for n in &names {
                    model.remove(n);
                }
                known.remove(&names);
            } else {
                for (n, v) in &batch {
                    model.insert(n.clone(), v.clone());
                }
                known.upsert(
                    batch
                        .into_iter()
                        .map(|(n, v)| (Arc::from(n.as_str()), Version::new(&v))),
                );
            }
            let got: Vec<(String, String)> = known
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect();
            let want: Vec<(String, String)> = model.clone().into_iter().collect();
            assert_eq!(got, want, "round {round}");
            for (n, v) in &model {
                assert_eq!(known.get(n).map(ToString::to_string).as_ref(), Some(v));
            }
            assert!(known.get("ns/w-400").is_none());
        }
    }

    #[test]
    fn a_version_is_sent_back_exactly_as_it_came() {
        for v in [
            "00a1b2c3d4e5f607",
            "ffffffffffffffff",
            "0000000000000000",
            // Not ours: upper case, other lengths, other characters, empty.
            "00A1B2C3D4E5F607",
            "a1b2c3d4e5f607",
            "00a1b2c3d4e5f6070",
            "2026-12-07T05:00:00Z",
            "",
            "+0a1b2c3d4e5f607",
        ] {
            assert_eq!(Version::new(v).to_string(), v);
        }
        assert!(matches!(Version::new("00a1b2c3d4e5f607"), Version::Hex(_)));
        assert!(matches!(Version::new("00A1B2C3D4E5F607"), Version::Text(_)));
        // 10k of them are held per agent.
        assert_eq!(std::mem::size_of::<Version>(), 16);
    }
}
