//! Version vectors: per path, how many changes each node has made to it.
//!
//! A zero counter means the same as an absent one. The map never stores zeros (they
//! are dropped when a vector is built or deserialized), so the derived equality is
//! the semantic one and two nodes never disagree about "same version" over an
//! encoding detail.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

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
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "BTreeMap<String, u64>", into = "BTreeMap<String, u64>")]
pub struct VersionVector(BTreeMap<String, u64>);

impl VersionVector {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn get(&self, node: &str) -> u64 {
        self.0.get(node).copied().unwrap_or(0)
    }

    /// Records one more change by `node`.
    ///
    /// Saturates rather than overflowing: counters can arrive from peers, and a
    /// hostile `u64::MAX` must not panic the node (it only stops that node's own
    /// changes from dominating, which surfaces as conflicts, not as lost data).
    pub fn bump(&mut self, node: &str) {
        let n = self.0.entry(node.to_string()).or_insert(0);
        *n = n.saturating_add(1);
    }

    /// Element-wise maximum: a version that has seen both.
    pub fn merge(&self, other: &VersionVector) -> VersionVector {
        let mut out = self.0.clone();
        for (node, &n) in &other.0 {
            let e = out.entry(node.clone()).or_insert(0);
            *e = (*e).max(n);
        }
        VersionVector(out)
    }

    pub fn compare(&self, other: &VersionVector) -> VvOrdering {
        let (mut greater, mut less) = (false, false);
        // Keys of one side are looked up in the other; zeros are never stored, so
        // a key missing on one side is a strict difference.
        for (node, &a) in &self.0 {
            let b = other.get(node);
            greater |= a > b;
            less |= a < b;
        }
        for (node, &b) in &other.0 {
            less |= b > self.get(node);
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
        self.0.iter().map(|(k, &v)| (k.as_str(), v))
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
    fn from(mut map: BTreeMap<String, u64>) -> Self {
        map.retain(|_, n| *n != 0);
        VersionVector(map)
    }
}

impl From<VersionVector> for BTreeMap<String, u64> {
    fn from(v: VersionVector) -> Self {
        v.0
    }
}

impl FromIterator<(String, u64)> for VersionVector {
    /// Repeated nodes keep their largest counter.
    fn from_iter<I: IntoIterator<Item = (String, u64)>>(iter: I) -> Self {
        let mut map = BTreeMap::new();
        for (node, n) in iter {
            let e = map.entry(node).or_insert(0);
            *e = n.max(*e);
        }
        VersionVector::from(map)
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
        fn bumping_dominates(x in arb(), node in "[abcde]") {
            let mut b = x.clone();
            b.bump(&node);
            prop_assert_eq!(b.compare(&x), VvOrdering::Greater);
        }
    }
}
