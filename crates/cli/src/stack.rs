//! `--stack` / `IAM_BROKER_STACK`: the deployed stack's outputs supply what an operator would
//! otherwise copy by hand (table names, the kubeconfig parameter, the sidecar image, URLs).
//! Variables set explicitly in the environment still win.

use std::collections::BTreeMap;

use anyhow::{Context as _, bail};
use iam_broker_kernel::config::{
    ENV_ALLOWANCES_TABLE, ENV_AUTHORIZATIONS_TABLE, ENV_CLUSTER_NAME, ENV_CLUSTERS_TABLE,
    ENV_IDENTITY_MODE, ENV_INJECTION, ENV_KUBECONFIG_PARAMETER, ENV_PROXY_IMAGE,
};
use iam_broker_kernel::{Config, ConfigError};

/// Environment variable naming the stack (same as `--stack`).
pub const ENV_STACK: &str = "IAM_BROKER_STACK";

/// Stack output → the configuration variable it supplies.
const OUTPUT_VARIABLES: &[(&str, &str)] = &[
    (OUTPUT_ALLOWANCES_TABLE, ENV_ALLOWANCES_TABLE),
    (OUTPUT_AUTHORIZATIONS_TABLE, ENV_AUTHORIZATIONS_TABLE),
    (OUTPUT_CLUSTERS_TABLE, ENV_CLUSTERS_TABLE),
    (OUTPUT_KUBECONFIG_PARAMETER, ENV_KUBECONFIG_PARAMETER),
    (OUTPUT_PROXY_IMAGE, ENV_PROXY_IMAGE),
    (OUTPUT_INJECTION, ENV_INJECTION),
    (OUTPUT_CLUSTER_NAME, ENV_CLUSTER_NAME),
    (OUTPUT_IDENTITY_MODE, ENV_IDENTITY_MODE),
];

/// Output: the Allowances table's name.
pub const OUTPUT_ALLOWANCES_TABLE: &str = "AllowancesTableName";
/// Output: the Authorizations table's name.
pub const OUTPUT_AUTHORIZATIONS_TABLE: &str = "AuthorizationsTableName";
/// Output: the Clusters table's name (the cluster registry).
pub const OUTPUT_CLUSTERS_TABLE: &str = "ClustersTableName";
/// Output: the SSM parameter holding the webhook's kubeconfig.
pub const OUTPUT_KUBECONFIG_PARAMETER: &str = "KubeconfigParameterName";
/// Output: the sidecar image the webhook injects.
pub const OUTPUT_PROXY_IMAGE: &str = "ProxyImage";
/// Output: the default cluster's registered name (`CLUSTER_NAME`), when the stack has one.
pub const OUTPUT_CLUSTER_NAME: &str = "ClusterName";
/// Output: what the webhook gives pods (`secret` or `projected`).
pub const OUTPUT_IDENTITY_MODE: &str = "IdentityMode";
/// Output: how injected pods reach the broker (`sidecar` or `direct`).
pub const OUTPUT_INJECTION: &str = "Injection";
/// Output: the broker's URL (what sidecars call).
pub const OUTPUT_BROKER_URL: &str = "BrokerUrl";
/// Output: the webhook's URL without its secret path segment.
pub const OUTPUT_WEBHOOK_URL: &str = "WebhookUrlWithoutSecret";
/// Output: the role every brokered role must trust.
pub const OUTPUT_BROKER_ROLE: &str = "BrokerFunctionRoleArn";

/// The process environment, completed by a stack's outputs when one is named.
#[derive(Debug, Default)]
pub struct Environment {
    stack: Option<Stack>,
}

#[derive(Debug)]
struct Stack {
    name: String,
    outputs: BTreeMap<String, String>,
}

impl Environment {
    /// Reads the stack's outputs (one `DescribeStacks` call) when `stack` names one.
    pub async fn load(stack: Option<String>) -> anyhow::Result<Self> {
        let Some(name) = stack.filter(|s| !s.trim().is_empty()) else {
            return Ok(Self::default());
        };
        let sdk = iam_broker_aws::load_sdk_config(Config::default().aws_call_timeout).await;
        let region = sdk
            .region()
            .map_or_else(|| "(no region)".to_owned(), ToString::to_string);
        let answer = aws_sdk_cloudformation::Client::new(&sdk)
            .describe_stacks()
            .stack_name(&name)
            .send()
            .await
            .map_err(|error| {
                let missing = error
                    .as_service_error()
                    .and_then(|e| e.meta().message())
                    .is_some_and(|m| m.contains("does not exist"));
                if missing {
                    anyhow::anyhow!(
                        "stack {name:?} does not exist in {region} (is AWS_REGION the stack's \
                         region? `sam deploy` names it in samconfig.toml's stack_name)"
                    )
                } else {
                    anyhow::Error::new(iam_broker_aws::explain(
                        iam_broker_aws::Service::CloudFormation,
                        sdk.region(),
                        error,
                    ))
                    .context(format!("cannot read the outputs of stack {name:?}"))
                }
            })?;
        let Some(stack) = answer.stacks().first() else {
            bail!("stack {name:?} does not exist in {region}");
        };
        let outputs = stack
            .outputs()
            .iter()
            .filter_map(|o| Some((o.output_key()?.to_owned(), o.output_value()?.to_owned())))
            .collect();
        Ok(Self {
            stack: Some(Stack { name, outputs }),
        })
    }

    /// An environment with given outputs (tests).
    #[cfg(test)]
    fn with_outputs(name: &str, outputs: &[(&str, &str)]) -> Self {
        Self {
            stack: Some(Stack {
                name: name.to_owned(),
                outputs: outputs
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            }),
        }
    }

    /// A variable: the process environment when set and non-empty, else the stack output that
    /// supplies it.
    pub fn var(&self, name: &str) -> Option<String> {
        self.var_from(name, |n| std::env::var(n).ok())
    }

    fn var_from(&self, name: &str, env: impl Fn(&str) -> Option<String>) -> Option<String> {
        env(name).filter(|v| !v.trim().is_empty()).or_else(|| {
            let output = OUTPUT_VARIABLES
                .iter()
                .find(|(_, variable)| *variable == name)?
                .0;
            self.output(output).map(str::to_owned)
        })
    }

    /// The typed configuration, with stack outputs filling unset variables.
    pub fn config(&self) -> Result<Config, ConfigError> {
        Config::from_lookup(|name| self.var(name))
    }

    /// One output of the stack, if a stack is named and has it.
    pub fn output(&self, key: &str) -> Option<&str> {
        self.stack
            .as_ref()
            .and_then(|s| s.outputs.get(key))
            .map(String::as_str)
    }

    /// One output, or an error saying what to pass instead.
    pub fn require_output(&self, key: &str, instead: &str) -> anyhow::Result<&str> {
        match &self.stack {
            None => bail!("pass {instead}, or name the stack with --stack NAME / {ENV_STACK}"),
            Some(stack) => self.output(key).with_context(|| {
                format!(
                    "stack {:?} has no output {key} (deployed from an older template.yaml? \
                     re-run `sam deploy`), or pass {instead}",
                    stack.name
                )
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_variables_win_over_outputs() {
        let env = Environment::with_outputs(
            "iam-broker",
            &[
                (OUTPUT_ALLOWANCES_TABLE, "iam-broker-Allowances-X"),
                (OUTPUT_AUTHORIZATIONS_TABLE, "iam-broker-Authorizations-Y"),
            ],
        );
        let explicit = |name: &str| (name == ENV_ALLOWANCES_TABLE).then(|| "mine".to_owned());
        assert_eq!(
            env.var_from(ENV_ALLOWANCES_TABLE, explicit).as_deref(),
            Some("mine")
        );
        assert_eq!(
            env.var_from(ENV_AUTHORIZATIONS_TABLE, explicit).as_deref(),
            Some("iam-broker-Authorizations-Y")
        );
        let empty = |_: &str| Some("  ".to_owned());
        assert_eq!(
            env.var_from(ENV_ALLOWANCES_TABLE, empty).as_deref(),
            Some("iam-broker-Allowances-X"),
            "an empty variable counts as unset"
        );
        assert_eq!(env.var_from("SOMETHING_ELSE", |_| None), None);
    }

    #[test]
    fn missing_outputs_say_what_to_pass() {
        let none = Environment::default();
        let error = none.require_output(OUTPUT_BROKER_URL, "--url").unwrap_err();
        assert!(
            error
                .to_string()
                .contains("--stack NAME / IAM_BROKER_STACK")
        );
        let old = Environment::with_outputs("old", &[]);
        let error = old.require_output(OUTPUT_BROKER_URL, "--url").unwrap_err();
        assert!(
            error.to_string().contains("has no output BrokerUrl"),
            "{error}"
        );
    }
}
