//! The per-token credentials cache: a bounded map keyed by the SHA-256 of the caller's
//! `Authorization` header, with single-flight broker calls and background refresh.
//!
//! Every decision about time is [`Policy`]'s; this module keeps the state and runs the broker
//! calls. A broker call is a *flight*: a spawned task whose answer every caller waiting for the
//! same token shares, so concurrent misses make one call, and a call started by a refresh goes
//! on even when no caller waits for it. The raw token lives only in the requests and in the
//! flight that forwards it; the cache holds its hash.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderValue, StatusCode};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::answer::{Answer, ProxyError};
use crate::broker::{BrokerCallError, BrokerClient, BrokerReply};
use crate::clock::Clock;
use crate::policy::{EntryTimes, OnAnswer, OnHit, Policy, Window};

/// SHA-256 of an `Authorization` header value: the cache key. Two requests share an entry only
/// if they sent byte-identical headers.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct TokenKey([u8; 32]);

impl TokenKey {
    /// The key of `authorization`.
    pub(crate) fn of(authorization: &HeaderValue) -> Self {
        Self(Sha256::digest(authorization.as_bytes()).into())
    }

    /// The first 12 hex digits, for logs: enough to correlate, useless to an attacker.
    pub(crate) fn short(&self) -> String {
        hex::encode(&self.0[..6])
    }
}

/// Counts for tests and diagnostics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    /// Tokens with cached credentials.
    pub entries: usize,
    /// Broker calls under way.
    pub in_flight: usize,
}

/// Where an answer came from (for the request log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// The cache.
    Cache,
    /// A broker call.
    Broker,
}

impl Source {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Cache => "cache",
            Self::Broker => "broker",
        }
    }
}

/// Cached credentials of one token.
struct Entry {
    /// The broker's body, as received.
    body: Bytes,
    expiration: OffsetDateTime,
    fresh_until: OffsetDateTime,
    /// Failed refreshes in a row.
    failures: u32,
    retry_at: Option<OffsetDateTime>,
    /// Its min validity and refresh-ahead, fixed when cached.
    window: Window,
    /// When the entry was last used, on the cache's own counter (for LRU eviction).
    last_used: u64,
}

impl Entry {
    fn times(&self) -> EntryTimes {
        EntryTimes {
            expiration: self.expiration,
            fresh_until: self.fresh_until,
            retry_at: self.retry_at,
            window: self.window,
        }
    }

    fn answer(&self) -> Answer {
        Answer::Credentials {
            body: self.body.clone(),
            expiration: self.expiration,
        }
    }
}

/// A broker call's answer, once there is one.
type Flight = watch::Receiver<Option<Answer>>;

#[derive(Default)]
struct State {
    entries: HashMap<TokenKey, Entry>,
    flights: HashMap<TokenKey, Flight>,
    /// Counter for `Entry::last_used`.
    tick: u64,
}

/// The cache. Shared by every connection.
pub(crate) struct Cache {
    state: Mutex<State>,
    policy: Policy,
    max_entries: usize,
    clock: Arc<dyn Clock>,
    broker: BrokerClient,
}

impl Cache {
    /// An empty cache in front of `broker`.
    pub(crate) fn new(
        policy: Policy,
        max_entries: usize,
        clock: Arc<dyn Clock>,
        broker: BrokerClient,
    ) -> Self {
        Self {
            state: Mutex::default(),
            policy,
            max_entries: max_entries.max(1),
            clock,
            broker,
        }
    }

    /// Current counts.
    pub(crate) fn stats(&self) -> CacheStats {
        let state = self.lock();
        CacheStats {
            entries: state.entries.len(),
            in_flight: state.flights.len(),
        }
    }

    /// The answer for `authorization` (a non-empty header): cached credentials when the policy
    /// allows them, otherwise the answer of a broker call, shared with concurrent callers.
    pub(crate) async fn credentials(
        self: &Arc<Self>,
        authorization: HeaderValue,
        key: TokenKey,
    ) -> (Answer, Source) {
        let now = self.clock.now();
        let flight = {
            let mut guard = self.lock();
            let State {
                entries,
                flights,
                tick,
            } = &mut *guard;
            *tick += 1;
            if let Some(entry) = entries.get_mut(&key) {
                match self.policy.decide(&entry.times(), now) {
                    OnHit::Serve => {
                        entry.last_used = *tick;
                        return (entry.answer(), Source::Cache);
                    }
                    OnHit::ServeAndRefresh => {
                        entry.last_used = *tick;
                        let answer = entry.answer();
                        if live_flight(flights, &key).is_none() {
                            debug!(token_hash = %key.short(), "refreshing ahead in the background");
                            self.start_flight(flights, key, authorization);
                        }
                        return (answer, Source::Cache);
                    }
                    OnHit::Fetch => {
                        debug!(token_hash = %key.short(), "cached credentials are below min validity");
                        entries.remove(&key);
                    }
                }
            }
            match live_flight(flights, &key) {
                Some(flight) => flight,
                None => self.start_flight(flights, key, authorization),
            }
        };
        (wait(flight).await, Source::Broker)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; should it ever, the map is still consistent.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Spawns the broker call for `key` and registers it, so later callers join it.
    fn start_flight(
        self: &Arc<Self>,
        flights: &mut HashMap<TokenKey, Flight>,
        key: TokenKey,
        authorization: HeaderValue,
    ) -> Flight {
        let (sender, flight) = watch::channel(None);
        flights.insert(key, flight.clone());
        let cache = Arc::clone(self);
        tokio::spawn(async move {
            let started = Instant::now();
            let reply = cache.broker.fetch(authorization).await;
            let answer = cache.complete(key, reply, started);
            sender.send_replace(Some(answer));
        });
        flight
    }

    /// Applies a broker call's result to the cache and returns the answer for its callers.
    fn complete(
        &self,
        key: TokenKey,
        reply: Result<BrokerReply, BrokerCallError>,
        started: Instant,
    ) -> Answer {
        let now = self.clock.now();
        let latency_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let token_hash = key.short();
        let mut guard = self.lock();
        let state = &mut *guard;
        state.flights.remove(&key);
        match reply {
            Ok(BrokerReply::Credentials {
                body,
                expiration,
                max_age,
                no_store,
            }) => {
                let expires_in_s = (expiration - now).whole_seconds();
                match self.policy.admit(expiration, max_age, no_store, now) {
                    OnAnswer::Cache {
                        fresh_until,
                        window,
                    } => {
                        info!(%token_hash, expires_in_s, latency_ms, "credentials cached");
                        self.make_room(state, key, now);
                        state.tick += 1;
                        state.entries.insert(
                            key,
                            Entry {
                                body: body.clone(),
                                expiration,
                                fresh_until,
                                failures: 0,
                                retry_at: None,
                                window,
                                last_used: state.tick,
                            },
                        );
                        Answer::Credentials { body, expiration }
                    }
                    OnAnswer::ServeOnce => {
                        warn!(
                            %token_hash,
                            expires_in_s,
                            no_store,
                            latency_ms,
                            "the broker returned credentials below min validity; serving them without caching"
                        );
                        self.note_failure(state, key, now);
                        Answer::Credentials { body, expiration }
                    }
                    OnAnswer::Reject => {
                        warn!(%token_hash, expires_in_s, latency_ms, "the broker returned expired credentials");
                        self.note_failure(state, key, now);
                        ProxyError::expired_credentials().into_answer()
                    }
                }
            }
            Ok(BrokerReply::Refused {
                status,
                body,
                retry_after,
            }) => {
                if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
                    let evicted = state.entries.remove(&key).is_some();
                    info!(%token_hash, status = status.as_u16(), evicted, latency_ms, "the broker refused the token");
                } else {
                    warn!(%token_hash, status = status.as_u16(), latency_ms, "the broker failed");
                    self.note_failure(state, key, now);
                }
                Answer::Error {
                    status,
                    body: body.unwrap_or_else(|| ProxyError::broker_status(status).body()),
                    retry_after,
                }
            }
            Err(error) => {
                warn!(%token_hash, %error, latency_ms, "broker call failed");
                self.note_failure(state, key, now);
                ProxyError::from(&error).into_answer()
            }
        }
    }

    /// Backs off the next refresh of `key`'s entry, if there is one.
    fn note_failure(&self, state: &mut State, key: TokenKey, now: OffsetDateTime) {
        if let Some(entry) = state.entries.get_mut(&key) {
            entry.failures = entry.failures.saturating_add(1);
            let retry_at = self.policy.retry_at(entry.failures, now);
            entry.retry_at = Some(retry_at);
            debug!(
                token_hash = %key.short(),
                failures = entry.failures,
                retry_in_s = (retry_at - now).whole_seconds(),
                "refresh backs off"
            );
        }
    }

    /// Keeps the cache within `max_entries` before `key` is inserted: entries that can no longer
    /// be served go first, then the least recently used.
    fn make_room(&self, state: &mut State, key: TokenKey, now: OffsetDateTime) {
        if state.entries.contains_key(&key) || state.entries.len() < self.max_entries {
            return;
        }
        state.entries.retain(|_, entry| entry.times().servable(now));
        while state.entries.len() >= self.max_entries {
            let oldest = state
                .entries
                .iter()
                .min_by_key(|(_, entry)| entry.last_used)
                .map(|(key, _)| *key);
            let Some(oldest) = oldest else { break };
            state.entries.remove(&oldest);
            debug!(token_hash = %oldest.short(), "evicted the least recently used entry");
        }
    }
}

/// The running broker call for `key`, if any. A call whose task is gone without answering (it
/// cannot panic, but if it did) is forgotten, so the next caller starts a new one.
fn live_flight(flights: &mut HashMap<TokenKey, Flight>, key: &TokenKey) -> Option<Flight> {
    match flights.get(key) {
        Some(flight) if flight.has_changed().is_ok() => Some(flight.clone()),
        Some(_) => {
            flights.remove(key);
            None
        }
        None => None,
    }
}

/// Waits for a flight's answer.
async fn wait(mut flight: Flight) -> Answer {
    let answer = match flight.wait_for(Option::is_some).await {
        Ok(answer) => answer.clone(),
        Err(_) => None,
    };
    answer.unwrap_or_else(|| {
        ProxyError::internal("the broker call ended without an answer").into_answer()
    })
}
