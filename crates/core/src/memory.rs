//! In-memory stores: the adapter for local experiments, tests of the domain and benchmarks of
//! the broker's own overhead. Same semantics as the DynamoDB adapter, no durability.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;

use crate::allowance::{Allowance, Subject};
use crate::ports::{AllowanceStore, StoreError, TokenStore};
use crate::record::TokenRecord;
use crate::token::TokenHash;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave these maps half-updated (every update is one
    // map call), so a poisoned lock is still safe to use.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Allowances in a map.
#[derive(Debug, Default)]
pub struct MemoryAllowanceStore {
    rows: Mutex<BTreeMap<Subject, BTreeSet<String>>>,
}

#[async_trait]
impl AllowanceStore for MemoryAllowanceStore {
    async fn allowance(&self, subject: &Subject) -> Result<Option<Allowance>, StoreError> {
        Ok(lock(&self.rows).get(subject).map(|roles| Allowance {
            subject: subject.clone(),
            allowed_roles: roles.clone(),
        }))
    }

    async fn allow(&self, subject: &Subject, role_arn: &str) -> Result<Allowance, StoreError> {
        let mut rows = lock(&self.rows);
        let roles = rows.entry(subject.clone()).or_default();
        roles.insert(role_arn.to_owned());
        Ok(Allowance {
            subject: subject.clone(),
            allowed_roles: roles.clone(),
        })
    }

    async fn disallow(
        &self,
        subject: &Subject,
        role_arn: Option<&str>,
    ) -> Result<Option<Allowance>, StoreError> {
        let mut rows = lock(&self.rows);
        let Some(role_arn) = role_arn else {
            rows.remove(subject);
            return Ok(None);
        };
        let Some(roles) = rows.get_mut(subject) else {
            return Ok(None);
        };
        roles.remove(role_arn);
        if roles.is_empty() {
            rows.remove(subject);
            return Ok(None);
        }
        Ok(Some(Allowance {
            subject: subject.clone(),
            allowed_roles: roles.clone(),
        }))
    }

    async fn list(&self, namespace: Option<&str>) -> Result<Vec<Allowance>, StoreError> {
        Ok(lock(&self.rows)
            .iter()
            .filter(|(s, _)| namespace.is_none_or(|ns| s.namespace == ns))
            .map(|(subject, roles)| Allowance {
                subject: subject.clone(),
                allowed_roles: roles.clone(),
            })
            .collect())
    }
}

/// Token records in a map.
#[derive(Debug, Default)]
pub struct MemoryTokenStore {
    records: Mutex<BTreeMap<TokenHash, TokenRecord>>,
}

#[async_trait]
impl TokenStore for MemoryTokenStore {
    async fn record(&self, hash: &TokenHash) -> Result<Option<TokenRecord>, StoreError> {
        Ok(lock(&self.records).get(hash).cloned())
    }

    async fn insert(&self, record: &TokenRecord) -> Result<(), StoreError> {
        let mut records = lock(&self.records);
        if records.contains_key(&record.token_hash) {
            return Err(StoreError::AlreadyExists);
        }
        records.insert(record.token_hash.clone(), record.clone());
        Ok(())
    }

    async fn touch(
        &self,
        hash: &TokenHash,
        last_used: i64,
        expires: i64,
    ) -> Result<(), StoreError> {
        let mut records = lock(&self.records);
        let record = records.get_mut(hash).ok_or(StoreError::NotFound)?;
        record.last_used = Some(last_used);
        record.expires = expires;
        Ok(())
    }

    async fn delete(&self, hash: &TokenHash) -> Result<Option<TokenRecord>, StoreError> {
        Ok(lock(&self.records).remove(hash))
    }

    async fn list(&self) -> Result<Vec<TokenRecord>, StoreError> {
        Ok(lock(&self.records).values().cloned().collect())
    }
}
