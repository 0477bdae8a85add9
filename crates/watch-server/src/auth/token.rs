//! etcd's "simple" tokens: random strings mapped to a user in server memory, each valid for
//! `ttl` after its last use (etcd resets a simple token's TTL whenever it is presented).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::User;

struct Entry {
    user: Arc<User>,
    /// `None`: `now + ttl` is past what `Instant` can hold, i.e. never (the config caps the TTL
    /// at a year, so only a library caller can get here).
    expires: Option<Instant>,
}

impl Entry {
    fn expired(&self, now: Instant) -> bool {
        self.expires.is_some_and(|e| e <= now)
    }
}

struct Map {
    entries: HashMap<String, Entry>,
    /// Expired entries are swept when the map reaches this size; then it becomes twice the
    /// live count, so sweeping costs O(1) amortized per issued token and the map holds at most
    /// about twice the live tokens.
    sweep_at: usize,
}

/// The live tokens.
pub(crate) struct Tokens {
    ttl: Duration,
    map: Mutex<Map>,
}

/// Random bytes per token (hex-encoded: 48 characters).
const TOKEN_BYTES: usize = 24;

impl Tokens {
    pub(crate) fn new(ttl: Duration) -> Tokens {
        Tokens {
            ttl,
            map: Mutex::new(Map {
                entries: HashMap::new(),
                sweep_at: 1024,
            }),
        }
    }

    /// A new token for `user`, valid until `now + ttl` unless used again.
    pub(crate) fn issue(&self, user: Arc<User>, now: Instant) -> Result<String, getrandom::Error> {
        let mut raw = [0u8; TOKEN_BYTES];
        getrandom::fill(&mut raw)?;
        let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        let mut map = self.map.lock();
        if map.entries.len() >= map.sweep_at {
            map.entries.retain(|_, e| !e.expired(now));
            map.sweep_at = (map.entries.len() * 2).max(1024);
        }
        map.entries.insert(
            token.clone(),
            Entry {
                user,
                expires: now.checked_add(self.ttl),
            },
        );
        Ok(token)
    }

    /// The user of a live token, whose TTL restarts now; `None` if unknown or expired.
    pub(crate) fn user(&self, token: &str, now: Instant) -> Option<Arc<User>> {
        let mut map = self.map.lock();
        let entry = map.entries.get_mut(token)?;
        if entry.expired(now) {
            map.entries.remove(token);
            return None;
        }
        entry.expires = now.checked_add(self.ttl);
        Some(entry.user.clone())
    }

    /// Drops every token (authentication turned off).
    pub(crate) fn clear(&self) {
        self.map.lock().entries.clear();
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.lock().entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user() -> Arc<User> {
        Arc::new(User::for_tests("u"))
    }

    #[test]
    fn expires_after_ttl_without_use() {
        let tokens = Tokens::new(Duration::from_secs(300));
        let t0 = Instant::now();
        let token = tokens.issue(user(), t0).unwrap();
        assert_eq!(token.len(), 2 * TOKEN_BYTES);
        assert!(tokens.user(&token, t0 + Duration::from_secs(299)).is_some());
        // Used at 299 s: valid until 599 s.
        assert!(tokens.user(&token, t0 + Duration::from_secs(598)).is_some());
        assert!(tokens.user(&token, t0 + Duration::from_secs(898)).is_none());
        // Gone for good once seen expired.
        assert!(tokens.user(&token, t0).is_none());
        assert!(tokens.user("not-a-token", t0).is_none());
    }

    #[test]
    fn huge_ttl_never_overflows() {
        let tokens = Tokens::new(Duration::MAX);
        let t0 = Instant::now();
        let token = tokens.issue(user(), t0).unwrap();
        assert!(tokens.user(&token, t0 + Duration::from_secs(1)).is_some());
    }

    #[test]
    fn tokens_differ_and_expired_ones_are_swept() {
        let tokens = Tokens::new(Duration::from_secs(1));
        let t0 = Instant::now();
        let a = tokens.issue(user(), t0).unwrap();
        let b = tokens.issue(user(), t0).unwrap();
        assert_ne!(a, b);
        for _ in 0..2000 {
            tokens.issue(user(), t0).unwrap();
        }
        let later = t0 + Duration::from_secs(2);
        for _ in 0..2000 {
            tokens.issue(user(), later).unwrap();
        }
        // Everything issued at t0 expired and was swept on the way.
        assert!(tokens.len() < 4002, "{}", tokens.len());
    }
}
