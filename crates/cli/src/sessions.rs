//! `iam-broker sessions`: the kill switch. `revoke` stops new credentials for a namespace, a
//! ServiceAccount or one pod (a mark on its Allowances row that the broker and the webhook read
//! with the rows they already read) and makes the credentials already issued useless at AWS at
//! once (an inline deny on each affected role, `iam_broker_broker::revocation`). `list` shows
//! what is revoked and how long each deny must stay; `restore` lifts the mark and removes the
//! denies whose sessions have all expired.
//!
//! Order, and what a failure leaves: `revoke` writes the mark first (new credentials stop), then
//! each role's deny; a role whose deny cannot be written is reported and the command fails, the
//! mark stays, and running it again completes it (each scope's statement is replaced, never
//! doubled). Undoing the mark on a failed deny would reopen what the operator meant to close.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use serde_json::json;
use time::OffsetDateTime;

use iam_broker_aws::iam::{RolePolicies, role_name};
use iam_broker_broker::revocation::{
    self, IdentityBasis, POLICY_NAME, SID_PREFIX, Scope, iso, with_statement,
};
use iam_broker_kernel::allowance::{
    Allowance, RoleArn, Subject, WILDCARD_SERVICE_ACCOUNT, deciding_subjects,
};
use iam_broker_kernel::cluster::ClusterName;
use iam_broker_kernel::ports::{AllowanceStore, RevocationChange};

use crate::Output;
use crate::stack::Environment;

/// `sessions` subcommands.
#[derive(Debug, Subcommand)]
pub enum SessionsCommand {
    /// Stop new credentials for a namespace, a ServiceAccount or one pod, and deny at AWS every
    /// session issued to it before now (an inline policy on each role its rows allow).
    Revoke(ScopeArgs),
    /// Show what is revoked, and until when each role's deny must stay.
    List {
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Let new credentials flow again, and remove the denies whose sessions have all expired
    /// (the others stay: they only deny sessions issued before the revocation).
    Restore(ScopeArgs),
}

/// Who: `--namespace` alone is the whole namespace.
#[derive(Debug, Args)]
pub struct ScopeArgs {
    /// The registered cluster (NAME's rows and sessions); left out, the default cluster.
    #[arg(long, value_name = "NAME")]
    cluster: Option<String>,
    /// The namespace.
    #[arg(long)]
    namespace: String,
    /// One ServiceAccount of the namespace; left out, all of them.
    #[arg(long)]
    service_account: Option<String>,
    /// One pod of the ServiceAccount (its name, as in the session name).
    #[arg(long, requires = "service_account")]
    pod: Option<String>,
    /// The roles to deny (revoke only; repeat for several); left out, every role the
    /// Allowances rows grant the scope. Name them when the allowance is already withdrawn.
    #[arg(long = "role", value_name = "ARN")]
    roles: Vec<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

struct World {
    config: iam_broker_kernel::Config,
    allowances: std::sync::Arc<iam_broker_aws::DynamoAllowanceStore>,
    policies: RolePolicies,
}

/// Runs one `sessions` command.
pub async fn run(command: SessionsCommand, environment: &Environment) -> anyhow::Result<()> {
    let config = environment.config()?;
    let sdk = iam_broker_aws::load_sdk_config(config.aws_call_timeout).await;
    let aws = iam_broker_app::AwsAdapters::new(&config, &sdk);
    let world = World {
        allowances: aws.allowances.clone(),
        policies: RolePolicies::from_sdk(&sdk),
        config,
    };
    match command {
        SessionsCommand::Revoke(args) => revoke(&world, &args).await,
        SessionsCommand::Restore(args) => restore(&world, &args).await,
        SessionsCommand::List { output } => list(&world, output).await,
    }
}

/// The row that carries the scope's mark, and the scope as sessions name it.
fn resolve(world: &World, args: &ScopeArgs) -> anyhow::Result<(Subject, Scope)> {
    let rows_cluster = args
        .cluster
        .as_deref()
        .map(ClusterName::parse)
        .transpose()?;
    let service_account = args
        .service_account
        .as_deref()
        .unwrap_or(WILDCARD_SERVICE_ACCOUNT);
    if service_account == WILDCARD_SERVICE_ACCOUNT && args.service_account.is_some() {
        bail!("--service-account '*' is the whole namespace: leave --service-account out");
    }
    let row =
        Subject::allowance_row(&args.namespace, service_account)?.in_cluster(rows_cluster.clone());
    if let Some(pod) = &args.pod {
        iam_broker_kernel::allowance::Subject::service_account(&args.namespace, pod)
            .with_context(|| format!("--pod {pod:?} is not a pod name"))?;
    }
    // Sessions carry the cluster's name: NAME, else the default cluster's (CLUSTER_NAME).
    let session_cluster = rows_cluster.or_else(|| world.config.cluster_name.clone());
    let scope = Scope {
        cluster: session_cluster.map(|c| c.as_str().to_owned()),
        namespace: args.namespace.clone(),
        service_account: args.service_account.clone(),
        pod: args.pod.clone(),
    };
    Ok((row, scope))
}

/// Every role the rows deciding for the scope grant.
async fn granted_roles(world: &World, row: &Subject) -> anyhow::Result<BTreeSet<String>> {
    let default = world.config.cluster_name.as_ref();
    let mut roles = BTreeSet::new();
    if row.service_account == WILDCARD_SERVICE_ACCOUNT {
        let mut partitions = vec![row.partition()];
        if row.cluster.is_none()
            && let Some(name) = default
        {
            partitions.push(row.clone().in_cluster(Some(name.clone())).partition());
        }
        for partition in partitions {
            for allowance in world.allowances.list(Some(&partition)).await? {
                roles.extend(allowance.allowed_roles);
            }
        }
    } else {
        let rows = world
            .allowances
            .rows_for_all(&deciding_subjects(row, default))
            .await?;
        for allowance in rows.iter().filter_map(|r| r.allowance()) {
            roles.extend(allowance.allowed_roles.iter().cloned());
        }
    }
    Ok(roles)
}

fn basis(world: &World) -> IdentityBasis {
    IdentityBasis::of(world.config.session_tags, world.config.source_identity)
}

async fn revoke(world: &World, args: &ScopeArgs) -> anyhow::Result<()> {
    let (row, scope) = resolve(world, args)?;
    let roles: BTreeSet<String> = if args.roles.is_empty() {
        granted_roles(world, &row).await?
    } else {
        args.roles
            .iter()
            .map(|r| RoleArn::parse(r).map(|r| r.as_str().to_owned()))
            .collect::<Result<_, _>>()?
    };
    if roles.is_empty() {
        bail!(
            "no Allowances row grants a role to {}: name the roles whose sessions to deny with \
             --role ARN (sessions issued before a disallow may still be valid)",
            describe(&scope)
        );
    }
    for role in &roles {
        if role_name(role).is_none() {
            bail!("{role} is not a role ARN");
        }
    }
    let now = OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap_or_else(|_| OffsetDateTime::now_utc());
    let basis = basis(world);
    let statement = scope.deny_statement(basis, now);
    let (_, exact) = scope.identity_condition(basis);
    // First the mark: new credentials stop at once.
    let role_list: Vec<String> = roles.iter().cloned().collect();
    let change = match &scope.pod {
        Some(pod) => RevocationChange::Pod {
            pod: pod.clone(),
            denied_roles: role_list.clone(),
        },
        None => RevocationChange::Scope {
            at: now.unix_timestamp(),
            denied_roles: role_list.clone(),
        },
    };
    world.allowances.revise(&row, &change).await?;
    // Then each role's deny.
    let mut results = Vec::new();
    for role in &role_list {
        let outcome = deny(world, role, &statement).await;
        results.push((role.clone(), outcome));
    }
    let failed: Vec<&(String, anyhow::Result<()>)> =
        results.iter().filter(|(_, r)| r.is_err()).collect();
    let until = now
        + time::Duration::try_from(world.config.credential_duration)
            .unwrap_or(time::Duration::HOUR);
    match args.output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "scope": describe(&scope),
                "revoked_at": iso(now),
                "identity": basis.as_str(),
                "exact": exact,
                "statement": statement,
                "roles": results.iter().map(|(role, r)| json!({
                    "role_arn": role,
                    "denied": r.is_ok(),
                    "error": r.as_ref().err().map(|e| format!("{e:#}")),
                })).collect::<Vec<_>>(),
                "deny_needed_until": iso(until),
            }))?
        ),
        Output::Table => {
            println!(
                "revoked {} at {}: the broker serves it no new credentials",
                describe(&scope),
                iso(now)
            );
            for (role, result) in &results {
                match result {
                    Ok(()) => println!(
                        "  denied at AWS: sessions of {role} issued before {} (by {})",
                        iso(now),
                        basis.as_str()
                    ),
                    Err(e) => println!("  NOT denied on {role}: {e:#}"),
                }
            }
            if !exact {
                println!("  note: {}", inexact_note(basis, &scope));
            }
            println!(
                "  the denies must stay until {} (CREDENTIAL_DURATION_SECONDS after now); \
                 `iam-broker sessions restore` lets new credentials flow and removes them once \
                 they are due",
                iso(until)
            );
        }
    }
    if !failed.is_empty() {
        bail!(
            "{} of {} roles have no deny yet (new credentials are stopped): fix the cause and run \
             the same command again",
            failed.len(),
            results.len()
        );
    }
    Ok(())
}

/// Adds (or replaces) the scope's statement in the role's revocations policy.
async fn deny(world: &World, role: &str, statement: &serde_json::Value) -> anyhow::Result<()> {
    let name = role_name(role).context("not a role ARN")?;
    let current = world.policies.get(name, POLICY_NAME).await?;
    let document = with_statement(current.as_deref(), statement.clone())?;
    world.policies.put(name, POLICY_NAME, &document).await?;
    Ok(())
}

fn inexact_note(basis: IdentityBasis, scope: &Scope) -> String {
    match basis {
        IdentityBasis::SessionName => format!(
            "session names carry no cluster: sessions of {} from every cluster on these roles are \
             denied too (turn on STS_SESSION_TAGS or STS_SOURCE_IDENTITY to tell clusters apart)",
            describe(&Scope {
                cluster: None,
                ..scope.clone()
            })
        ),
        IdentityBasis::SourceIdentity => "without a cluster name, a namespace's SourceIdentity \
             prefix also matches a cluster named like the namespace; set CLUSTER_NAME"
            .to_owned(),
        IdentityBasis::SessionTags => {
            "names past 47 characters are matched on their first 47".to_owned()
        }
    }
}

async fn restore(world: &World, args: &ScopeArgs) -> anyhow::Result<()> {
    let (row, scope) = resolve(world, args)?;
    let change = match &scope.pod {
        Some(pod) => RevocationChange::LiftPod(pod.clone()),
        None => RevocationChange::LiftScope,
    };
    let Some(after) = world.allowances.revise(&row, &change).await? else {
        println!("nothing is revoked for {}", describe(&scope));
        return Ok(());
    };
    println!("restored {}: the broker serves it again", describe(&scope));
    let (gone, kept) = prune_denies(world, &after).await?;
    for role in &gone {
        println!("  removed the deny on {role}: every session it covered has expired");
    }
    for (role, until) in &kept {
        println!(
            "  the deny on {role} stays until {} (it denies only sessions issued before the \
             revocation; run restore again then)",
            iso(*until)
        );
    }
    Ok(())
}

/// Removes the expired iam-broker statements of each role the row lists; a role with none left
/// leaves the row's list. Returns the roles cleared and those whose deny must stay (with until
/// when).
async fn prune_denies(
    world: &World,
    row: &Allowance,
) -> anyhow::Result<(Vec<String>, Vec<(String, OffsetDateTime)>)> {
    let now = OffsetDateTime::now_utc();
    let (mut cleared, mut kept) = (Vec::new(), Vec::new());
    for role in &row.revocation.denied_roles {
        let Some(name) = role_name(role) else {
            continue;
        };
        let current = world.policies.get(name, POLICY_NAME).await?;
        let pruned = revocation::prune(
            current.as_deref(),
            None,
            now,
            world.config.credential_duration,
        )?;
        if !pruned.removed.is_empty() {
            match &pruned.document {
                Some(document) => world.policies.put(name, POLICY_NAME, document).await?,
                None => world.policies.delete(name, POLICY_NAME).await?,
            }
        }
        let ours_left = pruned
            .document
            .as_deref()
            .is_some_and(|d| d.contains(SID_PREFIX));
        match pruned.kept.iter().map(|(_, until)| *until).max() {
            Some(until) => kept.push((role.clone(), until)),
            None if !ours_left => cleared.push(role.clone()),
            None => {}
        }
    }
    if !cleared.is_empty() {
        world
            .allowances
            .revise(&row.subject, &RevocationChange::Undenied(cleared.clone()))
            .await?;
    }
    Ok((cleared, kept))
}

async fn list(world: &World, output: Output) -> anyhow::Result<()> {
    let rows: Vec<Allowance> = world
        .allowances
        .list(None)
        .await?
        .into_iter()
        .filter(|a| !a.revocation.is_empty())
        .collect();
    let mut entries = Vec::new();
    for row in &rows {
        let mut denies = Vec::new();
        for role in &row.revocation.denied_roles {
            let until = match role_name(role) {
                Some(name) => match world.policies.get(name, POLICY_NAME).await {
                    Ok(document) => {
                        latest_until(document.as_deref(), world.config.credential_duration)
                    }
                    Err(e) => {
                        denies.push(json!({ "role_arn": role, "error": format!("{e:#}") }));
                        continue;
                    }
                },
                None => None,
            };
            denies.push(json!({ "role_arn": role, "deny_needed_until": until.map(iso) }));
        }
        entries.push(json!({
            "cluster": row.subject.cluster.as_ref().map(ClusterName::as_str),
            "namespace": row.subject.namespace,
            "service_account": row.subject.service_account,
            "revoked_at": row.revocation.at.and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok()).map(iso),
            "revoked_pods": row.revocation.pods,
            "denies": denies,
        }));
    }
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&entries)?),
        Output::Table => {
            if entries.is_empty() {
                println!("nothing is revoked");
            }
            for e in &entries {
                let who = format!(
                    "{}{}/{}",
                    e["cluster"]
                        .as_str()
                        .map(|c| format!("{c}/"))
                        .unwrap_or_default(),
                    e["namespace"].as_str().unwrap_or(""),
                    e["service_account"].as_str().unwrap_or("")
                );
                let mut what = Vec::new();
                if let Some(at) = e["revoked_at"].as_str() {
                    what.push(format!("revoked at {at}"));
                }
                for pod in e["revoked_pods"].as_array().into_iter().flatten() {
                    what.push(format!("pod {} revoked", pod.as_str().unwrap_or("")));
                }
                if what.is_empty() {
                    what.push("restored".to_owned());
                }
                println!("{who:<40} {}", what.join(", "));
                for d in e["denies"].as_array().into_iter().flatten() {
                    match (d["deny_needed_until"].as_str(), d["error"].as_str()) {
                        (_, Some(error)) => println!(
                            "  {}: cannot read: {error}",
                            d["role_arn"].as_str().unwrap_or("")
                        ),
                        (Some(until), _) => println!(
                            "  deny on {} needed until {until}",
                            d["role_arn"].as_str().unwrap_or("")
                        ),
                        (None, _) => println!(
                            "  deny on {}: expired or gone (restore removes it)",
                            d["role_arn"].as_str().unwrap_or("")
                        ),
                    }
                }
            }
        }
    }
    Ok(())
}

/// When the latest iam-broker statement of a document may go (`None`: all may go now).
fn latest_until(document: Option<&str>, lifetime: Duration) -> Option<OffsetDateTime> {
    let pruned = revocation::prune(document, None, OffsetDateTime::now_utc(), lifetime).ok()?;
    pruned.kept.into_iter().map(|(_, until)| until).max()
}

fn describe(scope: &Scope) -> String {
    let cluster = scope
        .cluster
        .as_deref()
        .map(|c| format!("{c}/"))
        .unwrap_or_default();
    match (&scope.service_account, &scope.pod) {
        (Some(sa), Some(pod)) => format!("pod {pod} of {cluster}{}/{sa}", scope.namespace),
        (Some(sa), None) => format!("{cluster}{}/{sa}", scope.namespace),
        _ => format!("namespace {cluster}{}", scope.namespace),
    }
}
