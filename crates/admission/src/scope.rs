//! Whether a registered `MutatingWebhookConfiguration` sends a pod's CREATE to the webhook at
//! all: its rules, namespace and object selectors, and the `matchConditions` that
//! [`crate::registration::render_webhook`] writes, evaluated as the API server does. Pure:
//! `iam-broker explain` reads the registration, the namespace and the pod, and asks here.

use std::collections::BTreeMap;

use k8s_openapi::api::admissionregistration::v1::{MutatingWebhook, MutatingWebhookConfiguration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use crate::registration::system_namespace_condition;

/// The label the API server puts on every namespace: its own name.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// What one webhook of a registration does with a pod's CREATE.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct WebhookScope {
    /// The webhook's `name`.
    pub webhook: String,
    /// Whether the API server calls it for this pod (`false` at the first check that fails).
    pub calls: bool,
    /// Each check, in the API server's order, with its result.
    pub checks: Vec<ScopeCheck>,
}

/// One check of [`WebhookScope`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ScopeCheck {
    /// `rules`, `namespaceSelector`, `objectSelector` or `matchConditions`.
    pub check: &'static str,
    /// `Some(true)` passes, `Some(false)` fails, `None` could not be evaluated here (a CEL
    /// expression this code does not know, a namespace whose labels are unknown).
    pub passes: Option<bool>,
    /// Why, in words.
    pub detail: String,
}

/// Evaluates every webhook of `configuration` for a Pod CREATE in `namespace` (whose labels are
/// `namespace_labels`, `None` when they could not be read) with `pod_labels`.
pub fn pod_create_scope(
    configuration: &MutatingWebhookConfiguration,
    namespace: &str,
    namespace_labels: Option<&BTreeMap<String, String>>,
    pod_labels: &BTreeMap<String, String>,
) -> Vec<WebhookScope> {
    configuration
        .webhooks
        .iter()
        .flatten()
        .map(|hook| webhook_scope(hook, namespace, namespace_labels, pod_labels))
        .collect()
}

fn webhook_scope(
    hook: &MutatingWebhook,
    namespace: &str,
    namespace_labels: Option<&BTreeMap<String, String>>,
    pod_labels: &BTreeMap<String, String>,
) -> WebhookScope {
    let mut checks = vec![rules_check(hook)];
    checks.push(match namespace_labels {
        Some(labels) => selector_check(
            "namespaceSelector",
            hook.namespace_selector.as_ref(),
            labels,
            &format!("namespace {namespace}"),
        ),
        None if hook
            .namespace_selector
            .as_ref()
            .is_none_or(selects_everything) =>
        {
            ScopeCheck {
                check: "namespaceSelector",
                passes: Some(true),
                detail: "selects every namespace".to_owned(),
            }
        }
        None => ScopeCheck {
            check: "namespaceSelector",
            passes: None,
            detail: format!(
                "the labels of namespace {namespace} could not be read, so {} is not evaluated",
                describe(hook.namespace_selector.as_ref())
            ),
        },
    });
    checks.push(selector_check(
        "objectSelector",
        hook.object_selector.as_ref(),
        pod_labels,
        "the pod",
    ));
    checks.extend(condition_checks(hook, namespace));
    let calls = checks.iter().all(|c| c.passes != Some(false));
    WebhookScope {
        webhook: hook.name.clone(),
        calls,
        checks,
    }
}

fn rules_check(hook: &MutatingWebhook) -> ScopeCheck {
    let any = |list: &[String], value: &str| list.iter().any(|v| v == "*" || v == value);
    let matches = hook.rules.iter().flatten().any(|rule| {
        let groups = rule.api_groups.as_deref().unwrap_or_default();
        let versions = rule.api_versions.as_deref().unwrap_or_default();
        let resources = rule.resources.as_deref().unwrap_or_default();
        let operations = rule.operations.as_deref().unwrap_or_default();
        any(groups, "")
            && any(versions, "v1")
            && any(resources, "pods")
            && any(operations, "CREATE")
            && rule
                .scope
                .as_deref()
                .is_none_or(|s| matches!(s, "*" | "Namespaced"))
    });
    ScopeCheck {
        check: "rules",
        passes: Some(matches),
        detail: if matches {
            "a rule covers CREATE of pods (v1)".to_owned()
        } else {
            "no rule covers CREATE of pods (v1): the API server never calls this webhook for \
             new pods"
                .to_owned()
        },
    }
}

fn selects_everything(selector: &LabelSelector) -> bool {
    selector
        .match_labels
        .as_ref()
        .is_none_or(BTreeMap::is_empty)
        && selector
            .match_expressions
            .as_ref()
            .is_none_or(Vec::is_empty)
}

/// A selector in `kubectl`'s words: `a=b,c notin (d,e)`.
fn describe(selector: Option<&LabelSelector>) -> String {
    let Some(selector) = selector.filter(|s| !selects_everything(s)) else {
        return "{} (everything)".to_owned();
    };
    let mut parts: Vec<String> = selector
        .match_labels
        .iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    for e in selector.match_expressions.iter().flatten() {
        let values = e.values.as_deref().unwrap_or_default().join(",");
        parts.push(match e.operator.as_str() {
            "Exists" => e.key.clone(),
            "DoesNotExist" => format!("!{}", e.key),
            op => format!("{} {} ({values})", e.key, op.to_ascii_lowercase()),
        });
    }
    parts.join(",")
}

/// `matchLabels` and `matchExpressions` as the API server evaluates them (all must hold);
/// `Err` names an operator it does not know (the API server would have refused the object).
fn selects(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> Result<bool, String> {
    for (key, value) in selector.match_labels.iter().flatten() {
        if labels.get(key) != Some(value) {
            return Ok(false);
        }
    }
    for e in selector.match_expressions.iter().flatten() {
        let values = e.values.as_deref().unwrap_or_default();
        let label = labels.get(&e.key);
        let holds = match e.operator.as_str() {
            "In" => label.is_some_and(|l| values.contains(l)),
            "NotIn" => label.is_none_or(|l| !values.contains(l)),
            "Exists" => label.is_some(),
            "DoesNotExist" => label.is_none(),
            other => return Err(format!("unknown operator {other:?}")),
        };
        if !holds {
            return Ok(false);
        }
    }
    Ok(true)
}

fn selector_check(
    check: &'static str,
    selector: Option<&LabelSelector>,
    labels: &BTreeMap<String, String>,
    whose: &str,
) -> ScopeCheck {
    let Some(selector) = selector else {
        return ScopeCheck {
            check,
            passes: Some(true),
            detail: "none: selects everything".to_owned(),
        };
    };
    let shown = describe(Some(selector));
    match selects(selector, labels) {
        Ok(true) => ScopeCheck {
            check,
            passes: Some(true),
            detail: format!("{shown} selects {whose}"),
        },
        Ok(false) => ScopeCheck {
            check,
            passes: Some(false),
            detail: format!(
                "{shown} does not select {whose} (labels: {})",
                if labels.is_empty() {
                    "none".to_owned()
                } else {
                    labels
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(",")
                }
            ),
        },
        Err(why) => ScopeCheck {
            check,
            passes: None,
            detail: format!("{shown}: {why}"),
        },
    }
}

fn condition_checks(hook: &MutatingWebhook, namespace: &str) -> Vec<ScopeCheck> {
    let known = system_namespace_condition();
    hook.match_conditions
        .iter()
        .flatten()
        .map(|condition| {
            if condition.expression == known {
                let holds = !crate::registration::SYSTEM_NAMESPACE_PREFIXES
                    .iter()
                    .any(|p| namespace.starts_with(p));
                ScopeCheck {
                    check: "matchConditions",
                    passes: Some(holds),
                    detail: format!(
                        "{}: namespace {namespace} {}",
                        condition.name,
                        if holds {
                            "is not a system namespace"
                        } else {
                            "is a system namespace (kube-*, openshift-*)"
                        }
                    ),
                }
            } else {
                ScopeCheck {
                    check: "matchConditions",
                    passes: None,
                    detail: format!(
                        "{}: CEL expression not evaluated here: {}",
                        condition.name, condition.expression
                    ),
                }
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registration::{NamespaceScope, WebhookManifest, render_webhook};
    use iam_broker_kernel::config::IdentityMode;

    fn rendered(scope: NamespaceScope) -> MutatingWebhookConfiguration {
        let yaml = render_webhook(&WebhookManifest {
            name: "iam-broker".to_owned(),
            url: "https://broker.example/Prod/mutate/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
                .to_owned(),
            ca_bundle_pem: None,
            failure_policy: crate::registration::WebhookFailurePolicy::Ignore,
            timeout_seconds: 10,
            namespaces: scope,
            identity: IdentityMode::Projected,
        })
        .unwrap();
        serde_saphyr::from_str(&yaml).unwrap()
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn ns(name: &str) -> BTreeMap<String, String> {
        labels(&[(NAMESPACE_NAME_LABEL, name)])
    }

    #[test]
    fn the_rendered_registration_calls_for_an_application_namespace() {
        let scope = pod_create_scope(
            &rendered(NamespaceScope::default()),
            "team-a",
            Some(&ns("team-a")),
            &BTreeMap::new(),
        );
        assert_eq!(scope.len(), 1);
        assert!(scope[0].calls, "{scope:?}");
        assert!(scope[0].checks.iter().all(|c| c.passes == Some(true)));
    }

    #[test]
    fn excluded_system_and_unlabelled_namespaces_are_not_called() {
        let config = rendered(NamespaceScope::default());
        let excluded = pod_create_scope(
            &config,
            "kube-system",
            Some(&ns("kube-system")),
            &BTreeMap::new(),
        );
        let check = |s: &[WebhookScope], name: &str| {
            s[0].checks.iter().find(|c| c.check == name).unwrap().passes
        };
        assert!(!excluded[0].calls);
        assert_eq!(check(&excluded, "namespaceSelector"), Some(false));
        assert_eq!(check(&excluded, "matchConditions"), Some(false));
        let prefixed = pod_create_scope(
            &config,
            "openshift-x",
            Some(&ns("openshift-x")),
            &BTreeMap::new(),
        );
        assert!(!prefixed[0].calls);
        assert_eq!(check(&prefixed, "namespaceSelector"), Some(true));

        let opt_in = rendered(NamespaceScope {
            opt_in_label: Some(("iam-broker.io/inject".to_owned(), "enabled".to_owned())),
            ..NamespaceScope::default()
        });
        let without = pod_create_scope(&opt_in, "team-a", Some(&ns("team-a")), &BTreeMap::new());
        assert!(!without[0].calls);
        let mut with_label = ns("team-a");
        with_label.insert("iam-broker.io/inject".to_owned(), "enabled".to_owned());
        assert!(pod_create_scope(&opt_in, "team-a", Some(&with_label), &BTreeMap::new())[0].calls);
        // Unknown namespace labels: not evaluated, not a refusal.
        let unknown = pod_create_scope(&opt_in, "team-a", None, &BTreeMap::new());
        assert!(unknown[0].calls);
        assert_eq!(check(&unknown, "namespaceSelector"), None);
    }

    #[test]
    fn object_selectors_rules_and_unknown_conditions() {
        let mut config = rendered(NamespaceScope::default());
        let hook = &mut config.webhooks.as_mut().unwrap()[0];
        hook.object_selector = Some(LabelSelector {
            match_expressions: Some(vec![
                k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement {
                    key: "iam-broker.io/skip".to_owned(),
                    operator: "DoesNotExist".to_owned(),
                    values: None,
                },
            ]),
            match_labels: None,
        });
        hook.match_conditions.as_mut().unwrap().push(
            k8s_openapi::api::admissionregistration::v1::MatchCondition {
                name: "custom".to_owned(),
                expression: "object.metadata.name != 'x'".to_owned(),
            },
        );
        let pod = labels(&[("iam-broker.io/skip", "true")]);
        let skipped = pod_create_scope(&config, "team-a", Some(&ns("team-a")), &pod);
        assert!(!skipped[0].calls);
        let called = pod_create_scope(&config, "team-a", Some(&ns("team-a")), &BTreeMap::new());
        assert!(called[0].calls, "an unevaluated condition is not a refusal");
        assert!(
            called[0]
                .checks
                .iter()
                .any(|c| c.passes.is_none() && c.detail.contains("custom"))
        );

        let hook = &mut config.webhooks.as_mut().unwrap()[0];
        hook.rules.as_mut().unwrap()[0].operations = Some(vec!["DELETE".to_owned()]);
        let no_rule = pod_create_scope(&config, "team-a", Some(&ns("team-a")), &BTreeMap::new());
        assert!(!no_rule[0].calls);
        assert_eq!(no_rule[0].checks[0].passes, Some(false));
    }
}
