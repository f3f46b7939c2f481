//! Kubernetes Events for admissions that left a pod without credentials.
//!
//! Admission warnings reach only the client that created the pod; for pods of a Deployment, Job
//! or StatefulSet that client is a controller, so the user never sees "role not allowed" or
//! "failed open". The webhook therefore also records a Warning Event on the pod's controller (or
//! its ServiceAccount), where `kubectl describe` and `kubectl get events` show it. Events are
//! rate-limited per object and reason, so a crash-looping ReplicaSet makes one Event per window,
//! not one per pod.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use serde_json::Value;

use iam_broker_kernel::ports::ObjectRef;

/// At most one Event per object and reason within this window (per warm instance).
pub const EVENT_WINDOW: Duration = Duration::from_secs(600);
/// Objects remembered by the rate limiter; beyond it, entries older than the window go first.
pub const EVENT_KEYS: usize = 4096;
/// Time an Event write may take; it is best effort and never delays an admission for long.
pub const EVENT_BUDGET: Duration = Duration::from_millis(1000);

/// Why a pod got no credentials, as an Event `reason` and `message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// `reason` (CamelCase, stable; what alerts and `kubectl get events` filter on).
    pub reason: &'static str,
    /// `message`, for people. Never a token.
    pub message: String,
    /// The ServiceAccount's uid, when it was read (so `kubectl describe sa` finds the Event).
    pub service_account_uid: Option<String>,
}

/// `reason` when the ServiceAccount names a role that Allowances does not allow.
pub const REASON_ROLE_NOT_ALLOWED: &str = "RoleNotAllowed";
/// `reason` when no readable Allowances row allows the role and one of the rows is unreadable.
pub const REASON_ALLOWANCE_UNREADABLE: &str = "AllowanceUnreadable";
/// `reason` when the role annotation is not a role ARN.
pub const REASON_INVALID_ROLE_ANNOTATION: &str = "InvalidRoleAnnotation";
/// `reason` when a dependency failed and the pod was admitted without credentials.
pub const REASON_FAILED_OPEN: &str = "CredentialsNotInjected";
/// `reason` when a dependency failed and the pod was denied (failure policy `closed`).
pub const REASON_DENIED: &str = "PodDenied";

/// The object an Event about `pod` goes on: its controller (`ownerReferences` entry with
/// `controller: true`), else its ServiceAccount.
pub fn involved_object(
    pod: &Value,
    namespace: &str,
    service_account: &str,
    service_account_uid: Option<&str>,
) -> ObjectRef {
    let controller = pod["metadata"]["ownerReferences"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|owner| owner["controller"] == Value::Bool(true));
    let text = |v: &Value| v.as_str().filter(|s| !s.is_empty()).map(str::to_owned);
    if let Some(owner) = controller
        && let (Some(api_version), Some(kind), Some(name)) = (
            text(&owner["apiVersion"]),
            text(&owner["kind"]),
            text(&owner["name"]),
        )
    {
        return ObjectRef {
            api_version,
            kind,
            namespace: namespace.to_owned(),
            name,
            uid: text(&owner["uid"]),
        };
    }
    ObjectRef {
        api_version: "v1".to_owned(),
        kind: "ServiceAccount".to_owned(),
        namespace: namespace.to_owned(),
        name: service_account.to_owned(),
        uid: service_account_uid.map(str::to_owned),
    }
}

/// Lets through one Event per (object, reason) per [`EVENT_WINDOW`].
#[derive(Debug)]
pub struct EventLimiter {
    window: i64,
    capacity: usize,
    last: Mutex<HashMap<(ObjectRef, &'static str), i64>>,
}

impl Default for EventLimiter {
    fn default() -> Self {
        Self::new(EVENT_WINDOW, EVENT_KEYS)
    }
}

impl EventLimiter {
    /// A limiter with its window and the number of objects it remembers.
    pub fn new(window: Duration, capacity: usize) -> Self {
        Self {
            window: i64::try_from(window.as_secs()).unwrap_or(i64::MAX),
            capacity: capacity.max(1),
            last: Mutex::new(HashMap::new()),
        }
    }

    /// Whether an Event about `object` for `reason` may be recorded at `now` (epoch seconds);
    /// when it may, the limiter remembers it.
    pub fn allow(&self, object: &ObjectRef, reason: &'static str, now: i64) -> bool {
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        let key = (object.clone(), reason);
        if let Some(at) = last.get(&key)
            && now.saturating_sub(*at) < self.window
        {
            return false;
        }
        if last.len() >= self.capacity && !last.contains_key(&key) {
            let window = self.window;
            last.retain(|_, at| now.saturating_sub(*at) < window);
            if last.len() >= self.capacity {
                // Every remembered object is recent: forget the oldest one.
                if let Some(oldest) = last
                    .iter()
                    .min_by_key(|(_, at)| **at)
                    .map(|(k, _)| k.clone())
                {
                    last.remove(&oldest);
                }
            }
        }
        last.insert(key, now);
        true
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn events_go_on_the_controller_else_the_service_account() {
        let pod = json!({ "metadata": { "ownerReferences": [
            { "apiVersion": "v1", "kind": "Node", "name": "n", "uid": "x" },
            { "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d9f8b6c4",
              "uid": "rs-uid", "controller": true } ] } });
        let owner = involved_object(&pod, "team-a", "app", Some("sa-uid"));
        assert_eq!(
            (
                owner.kind.as_str(),
                owner.name.as_str(),
                owner.uid.as_deref()
            ),
            ("ReplicaSet", "web-7d9f8b6c4", Some("rs-uid"))
        );
        assert_eq!(owner.api_version, "apps/v1");
        assert_eq!(owner.namespace, "team-a");

        // a bare pod (or one whose owner is not its controller) reports on its ServiceAccount
        for pod in [
            json!({}),
            json!({ "metadata": { "ownerReferences": [
            { "apiVersion": "v1", "kind": "Node", "name": "n" } ] } }),
        ] {
            let sa = involved_object(&pod, "team-a", "app", Some("sa-uid"));
            assert_eq!(
                (sa.kind.as_str(), sa.name.as_str(), sa.uid.as_deref()),
                ("ServiceAccount", "app", Some("sa-uid"))
            );
        }
    }

    fn object(name: &str) -> ObjectRef {
        involved_object(&json!({}), "ns", name, None)
    }

    #[test]
    fn one_event_per_object_and_reason_per_window() {
        let limiter = EventLimiter::new(Duration::from_secs(600), 100);
        assert!(limiter.allow(&object("a"), REASON_ROLE_NOT_ALLOWED, 1_000));
        // the same object and reason within the window: held back
        assert!(!limiter.allow(&object("a"), REASON_ROLE_NOT_ALLOWED, 1_599));
        // another reason or another object: its own budget
        assert!(limiter.allow(&object("a"), REASON_FAILED_OPEN, 1_001));
        assert!(limiter.allow(&object("b"), REASON_ROLE_NOT_ALLOWED, 1_001));
        // after the window: again
        assert!(limiter.allow(&object("a"), REASON_ROLE_NOT_ALLOWED, 1_600));
    }

    #[test]
    fn the_limiter_stays_bounded() {
        let limiter = EventLimiter::new(Duration::from_secs(600), 3);
        for (i, name) in ["a", "b", "c", "d", "e"].iter().enumerate() {
            assert!(limiter.allow(&object(name), REASON_DENIED, 1_000 + i as i64));
        }
        let remembered = limiter.last.lock().unwrap().len();
        assert!(remembered <= 3, "{remembered}");
        // the newest is still remembered, the oldest was forgotten
        assert!(!limiter.allow(&object("e"), REASON_DENIED, 1_010));
        assert!(limiter.allow(&object("a"), REASON_DENIED, 1_010));
    }
}
