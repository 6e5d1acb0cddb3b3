//! The objects the state machine wrote most recently, kept parsed in memory so that a command
//! on an object written a moment ago (a pod's binding right after its creation, a status write
//! right after a spec write) neither reads RocksDB nor parses the stored JSON again.
//!
//! Two generations of at most `capacity` entries each: writes go into the current one; when
//! it is full it becomes the previous one and the old previous one is dropped. A key is found
//! in the current generation first, so an older value in the previous one is never seen. The
//! cache holds exactly what the store holds for each key it has (a deleted object is `None`)
//! and is written only after the store's batch was.

use std::collections::HashMap;

use crate::types::SharedObject;

/// Entries per generation by default: a few seconds of creates under load.
pub(crate) const DEFAULT_CAPACITY: usize = 2048;

/// What a lookup found in the cache.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Cached {
    /// The object as stored (`None`: known to be absent).
    Known(Option<SharedObject>),
    /// Not in the cache: ask the store.
    Unknown,
}

/// Recently written objects by storage key (see the module documentation).
#[derive(Debug)]
pub(crate) struct RecentObjects {
    capacity: usize,
    current: HashMap<String, Option<SharedObject>>,
    previous: HashMap<String, Option<SharedObject>>,
}

impl Default for RecentObjects {
    fn default() -> Self {
        RecentObjects::with_capacity(DEFAULT_CAPACITY)
    }
}

impl RecentObjects {
    pub(crate) fn with_capacity(capacity: usize) -> RecentObjects {
        RecentObjects {
            capacity: capacity.max(1),
            current: HashMap::new(),
            previous: HashMap::new(),
        }
    }

    /// The stored state of `storage_key`, if the cache knows it.
    pub(crate) fn get(&self, storage_key: &str) -> Cached {
        match self
            .current
            .get(storage_key)
            .or_else(|| self.previous.get(storage_key))
        {
            Some(object) => Cached::Known(object.clone()),
            None => Cached::Unknown,
        }
    }

    /// Records what the store now holds at `storage_key` (after its write succeeded).
    pub(crate) fn insert(&mut self, storage_key: String, object: Option<SharedObject>) {
        if self.current.len() >= self.capacity && !self.current.contains_key(&storage_key) {
            self.previous = std::mem::take(&mut self.current);
        }
        self.current.insert(storage_key, object);
    }

    /// Forgets everything (the store was replaced by a snapshot).
    pub(crate) fn clear(&mut self) {
        self.current.clear();
        self.previous.clear();
    }

    /// How many keys the cache knows.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.current.len()
            + self
                .previous
                .keys()
                .filter(|key| !self.current.contains_key(*key))
                .count()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn object(rv: &str) -> SharedObject {
        json!({"kind": "Pod", "metadata": {"name": "a", "resourceVersion": rv}}).into()
    }

    #[test]
    fn a_written_object_is_found_and_an_unwritten_key_is_unknown() {
        let mut recent = RecentObjects::with_capacity(4);
        recent.insert("pods/default/a".into(), Some(object("1")));
        assert_eq!(
            recent.get("pods/default/a"),
            Cached::Known(Some(object("1")))
        );
        assert_eq!(recent.get("pods/default/b"), Cached::Unknown);
    }

    #[test]
    fn a_deleted_object_is_known_to_be_absent() {
        let mut recent = RecentObjects::with_capacity(4);
        recent.insert("pods/default/a".into(), Some(object("1")));
        recent.insert("pods/default/a".into(), None);
        assert_eq!(recent.get("pods/default/a"), Cached::Known(None));
    }

    #[test]
    fn the_newest_write_of_a_key_wins_across_generations() {
        let mut recent = RecentObjects::with_capacity(2);
        recent.insert("a".into(), Some(object("1")));
        recent.insert("b".into(), Some(object("2")));
        // The current generation is full: "a" moves to the previous one, then is rewritten.
        recent.insert("c".into(), Some(object("3")));
        recent.insert("a".into(), Some(object("4")));
        assert_eq!(recent.get("a"), Cached::Known(Some(object("4"))));
        assert_eq!(recent.get("b"), Cached::Known(Some(object("2"))));
    }

    #[test]
    fn the_cache_holds_at_most_two_generations() {
        let mut recent = RecentObjects::with_capacity(3);
        for index in 0..10 {
            recent.insert(format!("key-{index}"), Some(object(&index.to_string())));
        }
        assert!(recent.len() <= 6, "{} keys kept", recent.len());
        assert_eq!(recent.get("key-0"), Cached::Unknown);
        assert_eq!(recent.get("key-9"), Cached::Known(Some(object("9"))));
    }

    #[test]
    fn clearing_forgets_every_key() {
        let mut recent = RecentObjects::with_capacity(3);
        recent.insert("a".into(), Some(object("1")));
        recent.clear();
        assert_eq!(recent.get("a"), Cached::Unknown);
    }
}
