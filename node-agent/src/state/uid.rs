//! A workload's uid, as everything that names the workload holds it: the store's tables,
//! services' endpoints, connections. One shared allocation, and the workload's own also
//! carries the pod's name: an agent holds every workload of the mesh, and uid and name
//! in one heap chunk instead of two is 16–32 bytes less each (one 96-byte chunk for a
//! Kubernetes uid and a typical pod name, where they took a 64- and a 48-byte one).

use std::borrow::Borrow;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

/// A uid, and behind it (after a NUL, which a uid never holds: the decoder refuses one)
/// the pod's name, if it carries it. Derefs, compares and hashes as the uid alone.
#[derive(Clone)]
pub struct Uid(Arc<str>);

/// What separates the uid from the name.
const SEPARATOR: char = '\0';

impl Uid {
    /// `uid` alone (a service's endpoint whose workload is not known yet).
    pub fn new(uid: &str) -> Self {
        debug_assert!(!uid.contains(SEPARATOR), "a uid with a NUL: {uid:?}");
        Self(uid.into())
    }

    /// `uid` and, behind it, the pod's `name`; `None` if the uid holds a NUL.
    pub fn with_name(uid: &str, name: &str) -> Option<Self> {
        if uid.contains(SEPARATOR) {
            return None;
        }
        let mut s = String::with_capacity(uid.len() + 1 + name.len());
        s.push_str(uid);
        s.push(SEPARATOR);
        s.push_str(name);
        Some(Self(s.as_str().into()))
    }

    /// The uid.
    pub fn as_str(&self) -> &str {
        self.0.split_once(SEPARATOR).map_or(&self.0, |(uid, _)| uid)
    }

    /// The pod's name it carries ("" if none).
    pub fn name(&self) -> &str {
        self.0.split_once(SEPARATOR).map_or("", |(_, name)| name)
    }

    /// The very same allocation (not only the same uid).
    pub fn ptr_eq(a: &Self, b: &Self) -> bool {
        Arc::ptr_eq(&a.0, &b.0)
    }
}

impl std::ops::Deref for Uid {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl Borrow<str> for Uid {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl From<&str> for Uid {
    fn from(uid: &str) -> Self {
        Self::new(uid)
    }
}

/// By the uid alone (as [`Borrow<str>`] requires): a workload's uid equals its
/// endpoint's.
impl PartialEq for Uid {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Uid {}

impl Hash for Uid {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl std::fmt::Display for Uid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Debug for Uid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.as_str().fmt(f)
    }
}

impl serde::Serialize for Uid {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn a_uid_carries_its_name_and_is_the_uid_alone_to_everyone_else() {
        let w = Uid::with_name("9f1c-uid", "web-0").unwrap();
        assert_eq!((&*w, w.name()), ("9f1c-uid", "web-0"));
        assert_eq!(w.to_string(), "9f1c-uid");
        assert_eq!(format!("{w:?}"), "\"9f1c-uid\"");
        let endpoint = Uid::new("9f1c-uid");
        assert_eq!((&*endpoint, endpoint.name()), ("9f1c-uid", ""));
        assert!(w == endpoint && !Uid::ptr_eq(&w, &endpoint));
        // Found by the uid in a set, whichever was put.
        let set: HashSet<Uid> = [w.clone()].into();
        assert!(set.contains("9f1c-uid") && set.contains(&endpoint));
        assert!(!set.contains("9f1c-uid\0web-0"));
        // Empty names, names with odd characters, and a uid with a NUL (refused).
        assert_eq!(Uid::with_name("u", "").unwrap().name(), "");
        let odd = Uid::with_name("u", "a\0b").unwrap();
        assert_eq!((&*odd, odd.name()), ("u", "a\0b"));
        assert!(Uid::with_name("u\0v", "n").is_none());
        assert_eq!(serde_json::to_string(&w).unwrap(), "\"9f1c-uid\"");
    }
}
