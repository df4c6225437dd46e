//! The subscription index: topic filters in a tree of levels, so finding the subscribers of a
//! topic costs one walk down the topic's levels (plus the `+` and `#` branches met on the way),
//! not one match per subscription.
//!
//! Matching follows [`crate::topic::matches`] exactly (the property test below checks it against
//! that function): `+` matches one level, `#` the level it stands on and everything below, and a
//! topic starting with `$` is matched by no filter whose first level is a wildcard.

use std::collections::HashMap;
use std::hash::Hash;

/// Filters to subscribers: at most one entry per (filter, subscriber), holding `V` (the granted
/// QoS and options, say).
#[derive(Debug)]
pub struct FilterIndex<K, V> {
    root: Node<K, V>,
    len: usize,
}

#[derive(Debug)]
struct Node<K, V> {
    /// Literal next levels.
    children: HashMap<Box<str>, Node<K, V>>,
    /// The `+` next level.
    plus: Option<Box<Node<K, V>>>,
    /// Subscribers whose filter ends in `#` here.
    hash: HashMap<K, V>,
    /// Subscribers whose filter ends exactly here.
    here: HashMap<K, V>,
}

impl<K, V> Default for Node<K, V> {
    fn default() -> Self {
        Node {
            children: HashMap::new(),
            plus: None,
            hash: HashMap::new(),
            here: HashMap::new(),
        }
    }
}

impl<K, V> Node<K, V> {
    fn is_empty(&self) -> bool {
        self.children.is_empty()
            && self.plus.is_none()
            && self.hash.is_empty()
            && self.here.is_empty()
    }
}

impl<K, V> Default for FilterIndex<K, V> {
    fn default() -> Self {
        FilterIndex {
            root: Node::default(),
            len: 0,
        }
    }
}

impl<K: Eq + Hash + Clone, V> FilterIndex<K, V> {
    pub fn new() -> Self {
        Self::default()
    }

    /// How many (filter, subscriber) entries the index holds.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds or replaces `key`'s subscription to `filter` (assumed valid:
    /// [`crate::topic::check_filter`]); returns the value it replaced.
    pub fn insert(&mut self, filter: &str, key: K, value: V) -> Option<V> {
        let mut node = &mut self.root;
        let mut levels = filter.split('/').peekable();
        while let Some(level) = levels.next() {
            if level == "#" && levels.peek().is_none() {
                let old = node.hash.insert(key, value);
                self.len += usize::from(old.is_none());
                return old;
            }
            node = if level == "+" {
                node.plus.get_or_insert_with(Box::default)
            } else {
                node.children.entry(level.into()).or_default()
            };
        }
        let old = node.here.insert(key, value);
        self.len += usize::from(old.is_none());
        old
    }

    /// `key`'s subscription to `filter`, if it has one.
    pub fn get(&self, filter: &str, key: &K) -> Option<&V> {
        let mut node = &self.root;
        let mut levels = filter.split('/').peekable();
        while let Some(level) = levels.next() {
            if level == "#" && levels.peek().is_none() {
                return node.hash.get(key);
            }
            node = if level == "+" {
                node.plus.as_deref()?
            } else {
                node.children.get(level)?
            };
        }
        node.here.get(key)
    }

    /// Removes `key`'s subscription to `filter`; returns its value. Branches left empty are
    /// pruned, so memory follows what is subscribed now, not what ever was.
    pub fn remove(&mut self, filter: &str, key: &K) -> Option<V> {
        let levels: Vec<&str> = filter.split('/').collect();
        let old = remove_at(&mut self.root, &levels, key);
        self.len -= usize::from(old.is_some());
        old
    }

    /// Calls `f` once for each (subscriber, value) whose filter matches `topic`; a subscriber with
    /// several matching filters is met once for each (MQTT leaves overlapping subscriptions to the
    /// server: the caller picks the highest QoS).
    pub fn for_each_match(&self, topic: &str, mut f: impl FnMut(&K, &V)) {
        let levels: Vec<&str> = topic.split('/').collect();
        let dollar = topic.starts_with('$');
        walk(&self.root, &levels, !dollar, &mut f);
    }
}

fn remove_at<K: Eq + Hash, V>(node: &mut Node<K, V>, levels: &[&str], key: &K) -> Option<V> {
    match levels {
        [] => node.here.remove(key),
        ["#"] => node.hash.remove(key),
        [level, rest @ ..] => {
            if *level == "+" {
                let child = node.plus.as_mut()?;
                let old = remove_at(child, rest, key);
                if child.is_empty() {
                    node.plus = None;
                }
                old
            } else {
                let child = node.children.get_mut(*level)?;
                let old = remove_at(child, rest, key);
                if child.is_empty() {
                    node.children.remove(*level);
                }
                old
            }
        }
    }
}

/// `wild_ok`: whether a wildcard may match the first of `levels` (false only for the first
/// level of a `$` topic).
fn walk<K, V>(node: &Node<K, V>, levels: &[&str], wild_ok: bool, f: &mut impl FnMut(&K, &V)) {
    if wild_ok {
        // `#` matches this level and everything below, including nothing ("a/#" matches "a").
        node.hash.iter().for_each(|(k, v)| f(k, v));
    }
    match levels {
        [] => node.here.iter().for_each(|(k, v)| f(k, v)),
        [level, rest @ ..] => {
            if let Some(child) = node.children.get(*level) {
                walk(child, rest, true, f);
            }
            if wild_ok {
                if let Some(child) = &node.plus {
                    walk(child, rest, true, f);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn matches_of(ix: &FilterIndex<u32, String>, t: &str) -> BTreeSet<(u32, String)> {
        let mut got = BTreeSet::new();
        ix.for_each_match(t, |k, v| {
            assert!(got.insert((*k, v.clone())), "({k}, {v}) met twice");
        });
        got
    }

    #[test]
    fn wildcards_and_the_dollar_rule() {
        let mut ix = FilterIndex::new();
        for (k, f) in ["a/b", "a/+", "a/#", "#", "+/b", "$SYS/#", "+/+/c", "a/b/#"]
            .iter()
            .enumerate()
        {
            ix.insert(f, k as u32, f.to_string());
        }
        let names =
            |t: &str| -> Vec<String> { matches_of(&ix, t).into_iter().map(|(_, f)| f).collect() };
        assert_eq!(names("a/b"), ["a/b", "a/+", "a/#", "#", "+/b", "a/b/#"]);
        assert_eq!(names("a"), ["a/#", "#"]);
        assert_eq!(names("x/y/c"), ["#", "+/+/c"]);
        assert_eq!(names("$SYS/load"), ["$SYS/#"]);
        assert_eq!(names("$SYS"), ["$SYS/#"]);
    }

    #[test]
    fn remove_prunes_and_replace_keeps_one_entry() {
        let mut ix = FilterIndex::new();
        assert_eq!(ix.insert("a/+/c", 1u32, 1u8), None);
        assert_eq!(ix.insert("a/+/c", 1, 2), Some(1));
        assert_eq!(ix.len(), 1);
        assert_eq!(ix.get("a/+/c", &1), Some(&2));
        assert_eq!(ix.get("a/+", &1), None);
        assert_eq!(ix.remove("a/+/c", &2), None);
        assert_eq!(ix.remove("a/+/c", &1), Some(2));
        assert!(ix.is_empty());
        assert!(ix.root.is_empty(), "every branch pruned: {:?}", ix.root);
    }

    fn level() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a".to_string()),
            Just("b".to_string()),
            Just("$s".to_string()),
            Just(String::new()),
        ]
    }

    fn topic_name() -> impl Strategy<Value = String> {
        prop::collection::vec(level(), 1..5).prop_map(|l| l.join("/"))
    }

    fn filter() -> impl Strategy<Value = String> {
        (
            prop::collection::vec(prop_oneof![level(), Just("+".to_string())], 1..5),
            any::<bool>(),
        )
            .prop_map(|(mut l, hash)| {
                if hash {
                    l.push("#".into());
                }
                l.join("/")
            })
            .prop_filter("a valid filter", |f| topic::check_filter(f).is_ok())
    }

    proptest! {
        /// The index finds exactly the (subscriber, filter) pairs whose filter
        /// `topic::matches` the topic, after any sequence of inserts and removes.
        #[test]
        fn index_agrees_with_topic_matches(
            ops in prop::collection::vec((any::<bool>(), 0u32..6, filter()), 1..60),
            topics in prop::collection::vec(topic_name(), 1..20),
        ) {
            let mut ix = FilterIndex::new();
            let mut model: BTreeSet<(u32, String)> = BTreeSet::new();
            for (add, key, f) in &ops {
                if *add {
                    ix.insert(f, *key, f.clone());
                    model.insert((*key, f.clone()));
                } else {
                    let had = model.remove(&(*key, f.clone()));
                    prop_assert_eq!(ix.remove(f, key).is_some(), had);
                }
                prop_assert_eq!(ix.len(), model.len());
            }
            for t in &topics {
                let want: BTreeSet<_> = model
                    .iter()
                    .filter(|(_, f)| topic::matches(f, t))
                    .cloned()
                    .collect();
                prop_assert_eq!(matches_of(&ix, t), want, "topic {}", t);
            }
        }
    }
}
