//! One async lock per key (a VM, a microVM), made on first use.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Serialises everything done to one key; keys are dropped when their object goes.
#[derive(Debug)]
pub struct KeyedLocks<K>(Mutex<HashMap<K, Arc<tokio::sync::Mutex<()>>>>);

impl<K> Default for KeyedLocks<K> {
    fn default() -> Self {
        Self(Mutex::new(HashMap::new()))
    }
}

impl<K: std::hash::Hash + Eq + Clone> KeyedLocks<K> {
    pub fn get(&self, key: &K) -> Arc<tokio::sync::Mutex<()>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).entry(key.clone()).or_default().clone()
    }

    /// Drops the lock of a key that is gone (holders keep theirs).
    pub fn forget(&self, key: &K) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(key);
    }
}
