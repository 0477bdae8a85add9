//! Which keys a watcher (or a history query) is interested in.

use bytes::Bytes;

use crate::error::WatchError;

/// A set of keys, compared as raw bytes in lexicographic order.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KeySelector {
    /// Exactly this key. Must not be empty.
    Key(Bytes),
    /// Every key that starts with these bytes. Any byte string is a valid prefix;
    /// `/`-delimited prefixes are a common case, not a rule. An empty prefix is [`KeySelector::All`].
    Prefix(Bytes),
    /// The half-open range `[start, end)`. `start < end` is required.
    Range {
        /// First key included.
        start: Bytes,
        /// First key excluded.
        end: Bytes,
    },
    /// Every key `>= start`.
    FromKey(Bytes),
    /// Every key.
    All,
}

impl KeySelector {
    /// Exactly `key`.
    pub fn key(key: impl Into<Bytes>) -> Self {
        Self::Key(key.into())
    }

    /// Every key starting with `prefix`.
    pub fn prefix(prefix: impl Into<Bytes>) -> Self {
        Self::Prefix(prefix.into())
    }

    /// Keys in `[start, end)`.
    pub fn range(start: impl Into<Bytes>, end: impl Into<Bytes>) -> Self {
        Self::Range {
            start: start.into(),
            end: end.into(),
        }
    }

    /// Keys `>= start`.
    pub fn from_key(start: impl Into<Bytes>) -> Self {
        Self::FromKey(start.into())
    }

    /// Builds a selector from etcd's `(key, range_end)` convention:
    /// an empty `range_end` selects the single `key`; `range_end == "\0"` selects every key
    /// `>= key` (everything when `key` is also `"\0"` or empty); otherwise `[key, range_end)`,
    /// recognised as a prefix when `range_end` is the prefix end of `key`.
    ///
    /// The result is normalised and validated (see [`KeySelector::validate`]).
    pub fn from_etcd_range(key: &[u8], range_end: &[u8]) -> Result<Self, WatchError> {
        let sel = if range_end.is_empty() {
            Self::Key(Bytes::copy_from_slice(key))
        } else if range_end == [0] {
            if key.is_empty() || key == [0] {
                Self::All
            } else {
                Self::FromKey(Bytes::copy_from_slice(key))
            }
        } else if !key.is_empty() && prefix_end(key).as_deref() == Some(range_end) {
            Self::Prefix(Bytes::copy_from_slice(key))
        } else {
            Self::Range {
                start: Bytes::copy_from_slice(key),
                end: Bytes::copy_from_slice(range_end),
            }
        };
        sel.normalize()
    }

    /// Checks the selector and rewrites equivalent forms to one canonical form:
    /// an empty prefix or an empty from-key becomes [`KeySelector::All`], and a prefix of only
    /// `0xff` bytes becomes a from-key selector (it has no finite end).
    pub fn normalize(self) -> Result<Self, WatchError> {
        self.validate()?;
        Ok(match self {
            Self::Prefix(p) if p.is_empty() => Self::All,
            Self::FromKey(k) if k.is_empty() => Self::All,
            Self::Prefix(p) if prefix_end(&p).is_none() => Self::FromKey(p),
            other => other,
        })
    }

    /// Checks that the selector selects at least one possible key.
    pub fn validate(&self) -> Result<(), WatchError> {
        match self {
            Self::Key(k) if k.is_empty() => Err(WatchError::EmptyKey),
            Self::Range { start, end } if start >= end => Err(WatchError::EmptyRange {
                start: start.clone(),
                end: end.clone(),
            }),
            _ => Ok(()),
        }
    }

    /// True if `key` is selected.
    pub fn matches(&self, key: &[u8]) -> bool {
        match self {
            Self::Key(k) => k.as_ref() == key,
            Self::Prefix(p) => key.starts_with(p),
            Self::Range { start, end } => start.as_ref() <= key && key < end.as_ref(),
            Self::FromKey(start) => start.as_ref() <= key,
            Self::All => true,
        }
    }

    /// The selector as a half-open byte interval `[start, end)`, `None` meaning unbounded.
    pub fn bounds(&self) -> (Bytes, Option<Bytes>) {
        match self {
            Self::Key(k) => {
                let mut end = Vec::with_capacity(k.len() + 1);
                end.extend_from_slice(k);
                end.push(0);
                (k.clone(), Some(Bytes::from(end)))
            }
            Self::Prefix(p) => (p.clone(), prefix_end(p).map(Bytes::from)),
            Self::Range { start, end } => (start.clone(), Some(end.clone())),
            Self::FromKey(k) => (k.clone(), None),
            Self::All => (Bytes::new(), None),
        }
    }

    /// Bytes of key material this selector holds (for memory accounting).
    pub fn heap_len(&self) -> usize {
        match self {
            Self::Key(k) | Self::Prefix(k) | Self::FromKey(k) => k.len(),
            Self::Range { start, end } => start.len() + end.len(),
            Self::All => 0,
        }
    }
}

/// The smallest key greater than every key starting with `prefix`: the prefix with its last
/// byte below `0xff` incremented and the bytes after it dropped. `None` when no such key exists
/// (the prefix is empty or all `0xff`).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let last = prefix.iter().rposition(|&b| b != 0xff)?;
    let mut end = prefix[..=last].to_vec();
    end[last] += 1;
    Some(end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_rules() {
        assert_eq!(prefix_end(b"foo"), Some(b"fop".to_vec()));
        assert_eq!(prefix_end(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(b"\xff\xff"), None);
        assert_eq!(prefix_end(b""), None);
    }

    #[test]
    fn etcd_range_forms() {
        assert_eq!(
            KeySelector::from_etcd_range(b"k", b"").unwrap(),
            KeySelector::key("k")
        );
        assert_eq!(
            KeySelector::from_etcd_range(b"foo", b"fop").unwrap(),
            KeySelector::prefix("foo")
        );
        assert_eq!(
            KeySelector::from_etcd_range(b"foo", b"\0").unwrap(),
            KeySelector::from_key("foo")
        );
        assert_eq!(
            KeySelector::from_etcd_range(b"\0", b"\0").unwrap(),
            KeySelector::All
        );
        assert_eq!(
            KeySelector::from_etcd_range(b"a", b"c").unwrap(),
            KeySelector::range("a", "c")
        );
        assert!(matches!(
            KeySelector::from_etcd_range(b"b", b"a"),
            Err(WatchError::EmptyRange { .. })
        ));
        assert!(matches!(
            KeySelector::from_etcd_range(b"a", b"a"),
            Err(WatchError::EmptyRange { .. })
        ));
        assert!(matches!(
            KeySelector::from_etcd_range(b"", b""),
            Err(WatchError::EmptyKey)
        ));
    }

    #[test]
    fn matching() {
        assert!(KeySelector::prefix("ab").matches(b"abc"));
        assert!(KeySelector::prefix("ab").matches(b"ab"));
        assert!(!KeySelector::prefix("ab").matches(b"a"));
        // A prefix need not end in '/': "/svc" matches "/svc2/x".
        assert!(KeySelector::prefix("/svc").matches(b"/svc2/x"));
        assert!(KeySelector::range("b", "d").matches(b"c"));
        assert!(!KeySelector::range("b", "d").matches(b"d"));
        assert!(KeySelector::from_key("b").matches(b"zz"));
        assert!(!KeySelector::from_key("b").matches(b"a"));
        assert!(KeySelector::All.matches(b""));
    }

    #[test]
    fn normalize_forms() {
        assert_eq!(
            KeySelector::prefix("").normalize().unwrap(),
            KeySelector::All
        );
        assert_eq!(
            KeySelector::from_key("").normalize().unwrap(),
            KeySelector::All
        );
        assert_eq!(
            KeySelector::prefix(&b"\xff"[..]).normalize().unwrap(),
            KeySelector::from_key(&b"\xff"[..])
        );
    }
}
