//! A set of sequence numbers stored as sorted, disjoint, inclusive ranges: how the manifest
//! writes "acknowledged 0..=9999" in a few bytes, and how the verifier tracks what it has seen.

use serde::{Deserialize, Deserializer, Serialize};

/// Sorted, disjoint, non-adjacent inclusive ranges. Serialized as `[[first, last], ...]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct RangeSet {
    // Invariant: sorted by start; for consecutive (a, b), (c, d): b + 1 < c; and a <= b.
    ranges: Vec<(u64, u64)>,
}

impl RangeSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `n`; returns false if it was already present. Appending in increasing order (the
    /// common case) is O(1).
    pub fn insert(&mut self, n: u64) -> bool {
        if let Some(last) = self.ranges.last_mut() {
            if n > last.1 {
                if n == last.1 + 1 {
                    last.1 = n;
                } else {
                    self.ranges.push((n, n));
                }
                return true;
            }
        } else {
            self.ranges.push((n, n));
            return true;
        }
        // Out of order: find the first range that ends at or after n.
        let i = self.ranges.partition_point(|&(_, end)| end < n);
        let Some(&(start, _)) = self.ranges.get(i) else {
            return false; // unreachable: n <= last end
        };
        if start <= n {
            return false;
        }
        let joins_prev = i > 0 && self.ranges.get(i - 1).is_some_and(|p| p.1 + 1 == n);
        let joins_next = start == n + 1;
        match (joins_prev, joins_next) {
            (true, true) => {
                let end = self.ranges.remove(i).1;
                if let Some(p) = self.ranges.get_mut(i - 1) {
                    p.1 = end;
                }
            }
            (true, false) => {
                if let Some(p) = self.ranges.get_mut(i - 1) {
                    p.1 = n;
                }
            }
            (false, true) => {
                if let Some(r) = self.ranges.get_mut(i) {
                    r.0 = n;
                }
            }
            (false, false) => self.ranges.insert(i, (n, n)),
        }
        true
    }

    /// Adds every number in `first..=last`.
    pub fn insert_range(&mut self, first: u64, last: u64) {
        // Ranges in a manifest are short lists; the simple way is fast enough and obviously right.
        if self
            .ranges
            .last()
            .is_none_or(|l| first > l.1.saturating_add(1))
            && first <= last
        {
            self.ranges.push((first, last));
            return;
        }
        for n in first..=last {
            self.insert(n);
        }
    }

    pub fn contains(&self, n: u64) -> bool {
        let i = self.ranges.partition_point(|&(_, end)| end < n);
        self.ranges.get(i).is_some_and(|&(start, _)| start <= n)
    }

    /// How many numbers the set holds.
    pub fn count(&self) -> u64 {
        self.ranges.iter().map(|&(a, b)| b - a + 1).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.ranges
    }

    /// The largest number in the set.
    pub fn max(&self) -> Option<u64> {
        self.ranges.last().map(|r| r.1)
    }

    /// Numbers in `self` that are not in `other`, as ranges.
    pub fn difference(&self, other: &RangeSet) -> RangeSet {
        let mut out = RangeSet::new();
        let mut j = 0;
        for &(mut a, b) in &self.ranges {
            while a <= b {
                // Skip other's ranges that end before a.
                while other.ranges.get(j).is_some_and(|r| r.1 < a) {
                    j += 1;
                }
                match other.ranges.get(j) {
                    Some(&(c, d)) if c <= b => {
                        if a < c {
                            out.ranges.push((a, c - 1));
                        }
                        if d >= b {
                            break;
                        }
                        a = d + 1;
                    }
                    _ => {
                        out.ranges.push((a, b));
                        break;
                    }
                }
            }
        }
        out
    }
}

impl<'de> Deserialize<'de> for RangeSet {
    /// Accepts ranges in any order, overlapping or not, and normalizes them; `[a, b]` with a > b
    /// is an error.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut raw: Vec<(u64, u64)> = Vec::deserialize(d)?;
        if let Some(&(a, b)) = raw.iter().find(|(a, b)| a > b) {
            return Err(serde::de::Error::custom(format!(
                "range [{a}, {b}] ends before it starts"
            )));
        }
        raw.sort_unstable();
        let mut ranges: Vec<(u64, u64)> = Vec::with_capacity(raw.len());
        for (a, b) in raw {
            match ranges.last_mut() {
                Some(last) if a <= last.1.saturating_add(1) => last.1 = last.1.max(b),
                _ => ranges.push((a, b)),
            }
        }
        Ok(RangeSet { ranges })
    }
}

impl FromIterator<u64> for RangeSet {
    fn from_iter<I: IntoIterator<Item = u64>>(iter: I) -> Self {
        let mut s = RangeSet::new();
        for n in iter {
            s.insert(n);
        }
        s
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn in_order_inserts_compress_to_one_range() {
        let s: RangeSet = (0..10_000).collect();
        assert_eq!(s.ranges(), [(0, 9_999)]);
        assert_eq!(s.count(), 10_000);
        assert_eq!(serde_json::to_string(&s).unwrap(), "[[0,9999]]");
    }

    #[test]
    fn out_of_order_inserts_match_a_btreeset() {
        let mut state = 3u64;
        let mut s = RangeSet::new();
        let mut model = BTreeSet::new();
        for _ in 0..5_000 {
            let n = crate::device::splitmix64(&mut state) % 600;
            assert_eq!(s.insert(n), model.insert(n), "insert {n}");
        }
        for n in 0..610 {
            assert_eq!(s.contains(n), model.contains(&n));
        }
        assert_eq!(s.count(), model.len() as u64);
        for w in s.ranges().windows(2) {
            assert!(w[0].1 + 1 < w[1].0, "disjoint and not adjacent: {w:?}");
        }
    }

    #[test]
    fn difference_lists_what_is_missing() {
        let expected: RangeSet = (0..100).collect();
        let seen: RangeSet = (0..100)
            .filter(|n| !(10..20).contains(n) && *n != 50)
            .collect();
        assert_eq!(expected.difference(&seen).ranges(), [(10, 19), (50, 50)]);
        assert!(seen.difference(&expected).is_empty());
        assert_eq!(expected.difference(&RangeSet::new()), expected);
    }

    #[test]
    fn deserialize_normalizes_and_rejects_backwards_ranges() {
        let s: RangeSet = serde_json::from_str("[[5,9],[0,3],[4,4],[20,20]]").unwrap();
        assert_eq!(s.ranges(), [(0, 9), (20, 20)]);
        assert!(serde_json::from_str::<RangeSet>("[[3,1]]").is_err());
    }
}
