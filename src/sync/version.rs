//! Version vectors: per path, how many changes each node has made to it.
//!
//! A zero counter means the same as an absent one. The vector never stores zeros
//! (they are dropped when a vector is built or deserialized), and keeps its nodes
//! sorted and unique, so the derived equality is the semantic one and two nodes
//! never disagree about "same version" over an encoding detail.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// How two version vectors relate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VvOrdering {
    Equal,
    /// `self` has seen everything `other` has, and more.
    Greater,
    /// `other` has seen everything `self` has, and more.
    Less,
    /// Both have changes the other has not seen.
    Concurrent,
}

impl VvOrdering {
    /// The ordering seen from the other side.
    pub fn reverse(self) -> VvOrdering {
        match self {
            VvOrdering::Greater => VvOrdering::Less,
            VvOrdering::Less => VvOrdering::Greater,
            o => o,
        }
    }
}

/// Node name -> number of changes that node made. Absent entries count as zero.
///
/// A vector sorted by node name rather than a map: every index record, batch
/// entry and wire record carries one, and it nearly always holds one or two
/// nodes, which a `BTreeMap` spends a ~370-byte tree node on. Encoded as a map
/// (`{"a":2,"b":1}`), exactly as a map of the same pairs is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VersionVector(Vec<(Box<str>, u64)>);

impl VersionVector {
    pub fn new() -> Self {
        Self::default()
    }

    fn find(&self, node: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(n, _)| (**n).cmp(node))
    }

    pub fn get(&self, node: &str) -> u64 {
        self.find(node).map_or(0, |i| self.0[i].1)
    }

    /// Records one more change by `node`.
    ///
    /// Saturates rather than overflowing: counters can arrive from peers, and a
    /// hostile `u64::MAX` must not panic the node (it only stops that node's own
    /// changes from dominating, which surfaces as conflicts, not as lost data).
    pub fn bump(&mut self, node: &str) {
        match self.find(node) {
            Ok(i) => self.0[i].1 = self.0[i].1.saturating_add(1),
            Err(i) => self.0.insert(i, (node.into(), 1)),
        }
    }

    /// Element-wise maximum: a version that has seen both.
    pub fn merge(&self, other: &VersionVector) -> VersionVector {
        let (mut a, mut b) = (self.0.iter().peekable(), other.0.iter().peekable());
        let mut out = Vec::with_capacity(self.0.len().max(other.0.len()));
        loop {
            let next = match (a.peek(), b.peek()) {
                (Some(x), Some(y)) => match x.0.cmp(&y.0) {
                    std::cmp::Ordering::Less => a.next().cloned(),
                    std::cmp::Ordering::Greater => b.next().cloned(),
                    std::cmp::Ordering::Equal => {
                        let n = x.1.max(y.1);
                        b.next();
                        a.next().map(|(node, _)| (node.clone(), n))
                    }
                },
                (Some(_), None) => a.next().cloned(),
                (None, Some(_)) => b.next().cloned(),
                (None, None) => break,
            };
            out.extend(next);
        }
        VersionVector(out)
    }

    pub fn compare(&self, other: &VersionVector) -> VvOrdering {
        let (mut greater, mut less) = (false, false);
        // Both sides are sorted and hold no zeros: a node missing on one side is a
        // strict difference.
        let (mut a, mut b) = (self.0.iter().peekable(), other.0.iter().peekable());
        loop {
            match (a.peek(), b.peek()) {
                (Some(x), Some(y)) => match x.0.cmp(&y.0) {
                    std::cmp::Ordering::Less => {
                        greater = true;
                        a.next();
                    }
                    std::cmp::Ordering::Greater => {
                        less = true;
                        b.next();
                    }
                    std::cmp::Ordering::Equal => {
                        greater |= x.1 > y.1;
                        less |= x.1 < y.1;
                        a.next();
                        b.next();
                    }
                },
                (Some(_), None) => {
                    greater = true;
                    break;
                }
                (None, Some(_)) => {
                    less = true;
                    break;
                }
                (None, None) => break,
            }
        }
        match (greater, less) {
            (false, false) => VvOrdering::Equal,
            (true, false) => VvOrdering::Greater,
            (false, true) => VvOrdering::Less,
            (true, true) => VvOrdering::Concurrent,
        }
    }

    /// True when no node has made a change (the version of something never seen).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The non-zero counters, by node name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, u64)> {
        self.0.iter().map(|(k, v)| (&**k, *v))
    }

    /// From pairs in any order: a node given twice keeps its `pick`ed counter;
    /// zeros are dropped.
    fn from_pairs(mut pairs: Vec<(Box<str>, u64)>, pick: fn(u64, u64) -> u64) -> Self {
        if !pairs.windows(2).all(|w| w[0].0 < w[1].0) {
            // Stable: of a node given twice, the earlier pair comes first.
            pairs.sort_by(|x, y| x.0.cmp(&y.0));
            let mut unique: Vec<(Box<str>, u64)> = Vec::with_capacity(pairs.len());
            for (node, n) in pairs {
                match unique.last_mut() {
                    Some(last) if last.0 == node => last.1 = pick(last.1, n),
                    _ => unique.push((node, n)),
                }
            }
            pairs = unique;
        }
        pairs.retain(|(_, n)| *n != 0);
        VersionVector(pairs)
    }
}

/// `{a:2, b:1}`, for logs and plans.
impl fmt::Display for VersionVector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("{")?;
        for (i, (node, n)) in self.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            write!(f, "{sep}{node}:{n}")?;
        }
        f.write_str("}")
    }
}

impl From<BTreeMap<String, u64>> for VersionVector {
    fn from(map: BTreeMap<String, u64>) -> Self {
        VersionVector(
            map.into_iter()
                .filter(|(_, n)| *n != 0)
                .map(|(node, n)| (node.into_boxed_str(), n))
                .collect(),
        )
    }
}

impl From<VersionVector> for BTreeMap<String, u64> {
    fn from(v: VersionVector) -> Self {
        v.0.into_iter().map(|(k, n)| (k.into(), n)).collect()
    }
}

impl FromIterator<(String, u64)> for VersionVector {
    /// Repeated nodes keep their largest counter.
    fn from_iter<I: IntoIterator<Item = (String, u64)>>(iter: I) -> Self {
        let pairs = iter.into_iter().map(|(k, n)| (k.into_boxed_str(), n));
        VersionVector::from_pairs(pairs.collect(), u64::max)
    }
}

impl Serialize for VersionVector {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for VersionVector {
    /// A map of node names to counters; as when decoding a map, a node given twice
    /// keeps its last counter.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Pairs;
        impl<'de> Visitor<'de> for Pairs {
            type Value = VersionVector;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of node names to counters")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<VersionVector, M::Error> {
                // The announced length is the peer's word: capacity is capped.
                let mut pairs = Vec::with_capacity(map.size_hint().unwrap_or(0).min(16));
                while let Some((node, n)) = map.next_entry::<String, u64>()? {
                    pairs.push((node.into_boxed_str(), n));
                }
                Ok(VersionVector::from_pairs(pairs, |_, last| last))
            }
        }
        d.deserialize_map(Pairs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn vv(pairs: &[(&str, u64)]) -> VersionVector {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    #[test]
    fn orderings() {
        assert_eq!(
            vv(&[("a", 1)]).compare(&vv(&[("a", 1), ("b", 0)])),
            VvOrdering::Equal
        );
        assert_eq!(
            vv(&[("a", 2)]).compare(&vv(&[("a", 1)])),
            VvOrdering::Greater
        );
        assert_eq!(
            vv(&[("a", 1)]).compare(&vv(&[("a", 1), ("b", 1)])),
            VvOrdering::Less
        );
        assert_eq!(
            vv(&[("a", 2)]).compare(&vv(&[("a", 1), ("b", 1)])),
            VvOrdering::Concurrent
        );
        assert_eq!(vv(&[]).compare(&vv(&[("z", 0)])), VvOrdering::Equal);
        assert_eq!(vv(&[]).compare(&vv(&[("z", 1)])), VvOrdering::Less);
    }

    #[test]
    fn bump_get_and_emptiness() {
        let mut v = VersionVector::new();
        assert!(v.is_empty());
        v.bump("a");
        v.bump("a");
        v.bump("b");
        assert_eq!((v.get("a"), v.get("b"), v.get("z")), (2, 1, 0));
        assert!(!v.is_empty());
        assert_eq!(v.iter().collect::<Vec<_>>(), [("a", 2), ("b", 1)]);
        assert_eq!(v.to_string(), "{a:2, b:1}");
        assert_eq!(VersionVector::new().to_string(), "{}");
        let before = v.clone();
        v.bump("a");
        assert_eq!(v.compare(&before), VvOrdering::Greater);
    }

    #[test]
    fn zero_counters_are_absent_counters() {
        let with_zero = vv(&[("a", 1), ("b", 0)]);
        assert_eq!(with_zero, vv(&[("a", 1)]));
        assert_eq!(with_zero.iter().count(), 1);
        assert!(vv(&[("a", 0)]).is_empty());
        // Also when the zero comes from a peer's encoding.
        let decoded: VersionVector = serde_json::from_str(r#"{"a":1,"b":0}"#).unwrap();
        assert_eq!(decoded, vv(&[("a", 1)]));
    }

    #[test]
    fn bump_saturates_instead_of_panicking() {
        let mut v = vv(&[("a", u64::MAX)]);
        v.bump("a");
        assert_eq!(v.get("a"), u64::MAX);
    }

    #[test]
    fn serde_round_trips_as_a_plain_map() {
        let v = vv(&[("a", 3), ("b", 1)]);
        let json = serde_json::to_string(&v).unwrap();
        assert_eq!(json, r#"{"a":3,"b":1}"#);
        assert_eq!(serde_json::from_str::<VersionVector>(&json).unwrap(), v);
        let bytes = postcard::to_stdvec(&v).unwrap();
        assert_eq!(postcard::from_bytes::<VersionVector>(&bytes).unwrap(), v);
    }

    #[test]
    fn decoding_keeps_a_repeated_nodes_last_counter_and_sorts() {
        // As a map decoding does (a peer's encoding may repeat or reorder keys).
        let v: VersionVector = serde_json::from_str(r#"{"b":1,"a":2,"b":5,"c":0}"#).unwrap();
        assert_eq!(v, vv(&[("a", 2), ("b", 5)]));
        assert_eq!(v.iter().collect::<Vec<_>>(), [("a", 2), ("b", 5)]);
        // Built from pairs, a repeated node keeps its largest counter.
        assert_eq!(
            vv(&[("b", 5), ("a", 1), ("b", 2)]),
            vv(&[("a", 1), ("b", 5)])
        );
    }

    fn arb() -> impl Strategy<Value = VersionVector> {
        proptest::collection::btree_map("[abcd]", 0u64..4, 0..4).prop_map(VersionVector::from)
    }

    proptest! {
        #[test]
        fn merge_dominates_both_and_is_a_join(x in arb(), y in arb(), z in arb()) {
            let m = x.merge(&y);
            prop_assert!(matches!(m.compare(&x), VvOrdering::Greater | VvOrdering::Equal));
            prop_assert!(matches!(m.compare(&y), VvOrdering::Greater | VvOrdering::Equal));
            prop_assert_eq!(&m, &y.merge(&x));
            prop_assert_eq!(x.merge(&x), x.clone());
            prop_assert_eq!(m.merge(&z), x.merge(&y.merge(&z)));
            // The least such version: anything above both is above the merge.
            if matches!(z.compare(&x), VvOrdering::Greater | VvOrdering::Equal)
                && matches!(z.compare(&y), VvOrdering::Greater | VvOrdering::Equal)
            {
                prop_assert!(matches!(z.compare(&m), VvOrdering::Greater | VvOrdering::Equal));
            }
        }

        #[test]
        fn compare_is_antisymmetric_and_equal_means_equal(x in arb(), y in arb()) {
            let o = x.compare(&y);
            prop_assert_eq!(y.compare(&x), o.reverse());
            prop_assert_eq!(o == VvOrdering::Equal, x == y);
            prop_assert_eq!(x.compare(&x), VvOrdering::Equal);
        }

        #[test]
        fn compare_and_merge_agree_with_counter_by_counter(x in arb(), y in arb()) {
            let nodes: std::collections::BTreeSet<&str> = x.iter().chain(y.iter()).map(|(n, _)| n).collect();
            let greater = nodes.iter().any(|n| x.get(n) > y.get(n));
            let less = nodes.iter().any(|n| x.get(n) < y.get(n));
            let want = match (greater, less) {
                (false, false) => VvOrdering::Equal,
                (true, false) => VvOrdering::Greater,
                (false, true) => VvOrdering::Less,
                (true, true) => VvOrdering::Concurrent,
            };
            prop_assert_eq!(x.compare(&y), want);
            let m = x.merge(&y);
            for n in &nodes {
                prop_assert_eq!(m.get(n), x.get(n).max(y.get(n)));
            }
            prop_assert_eq!(m.iter().count(), nodes.len());
        }

        #[test]
        fn encodes_exactly_as_the_map_of_its_counters(x in arb()) {
            let map: BTreeMap<String, u64> = x.clone().into();
            prop_assert_eq!(postcard::to_stdvec(&x).unwrap(), postcard::to_stdvec(&map).unwrap());
            prop_assert_eq!(serde_json::to_string(&x).unwrap(), serde_json::to_string(&map).unwrap());
            let back: VersionVector = postcard::from_bytes(&postcard::to_stdvec(&map).unwrap()).unwrap();
            prop_assert_eq!(back, x);
        }

        #[test]
        fn bumping_dominates(x in arb(), node in "[abcde]") {
            let mut b = x.clone();
            b.bump(&node);
            prop_assert_eq!(b.compare(&x), VvOrdering::Greater);
        }
    }
}
