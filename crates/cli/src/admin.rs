//! Administration commands: allowances, tokens, clusters, tables.

use std::io::Read as _;

use anyhow::{Context as _, bail};
use iam_broker_app::AwsAdapters;
use iam_broker_aws::{DynamoAllowanceStore, DynamoTokenStore};
use iam_broker_kernel::allowance::{
    Allowance, RoleArn, RoleTerms, SessionPolicy, Subject, WILDCARD_SERVICE_ACCOUNT,
    deciding_subjects, is_allowed, unreadable, validate_external_id,
};
use iam_broker_kernel::clock::rfc3339;
use iam_broker_kernel::cluster::ClusterName;
use iam_broker_kernel::ports::{AllowanceStore, ClusterRegistry, TokenStore};
use iam_broker_kernel::record::{Grant, mint};
use iam_broker_kernel::{Config, Token, TokenHash, TokenRecord};
use serde_json::json;
use time::OffsetDateTime;

use crate::stack::Environment;
use crate::{Command, Output, TablesCommand, TokenCommand};

/// The configuration and the adapters an admin command works with.
struct Stores {
    config: Config,
    aws: AwsAdapters,
}

async fn stores(environment: &Environment) -> anyhow::Result<Stores> {
    let config = environment.config()?;
    let aws = AwsAdapters::load(&config).await;
    Ok(Stores { config, aws })
}

/// Runs every command but `serve`.
pub async fn run(command: Command, environment: &Environment) -> anyhow::Result<()> {
    let stores = stores(environment).await?;
    match command {
        Command::Serve { .. }
        | Command::RenderWebhook(_)
        | Command::Credentials(_)
        | Command::Sweep(_)
        | Command::Kubeconfig(_)
        | Command::Explain(_)
        | Command::Sessions(_)
        | Command::Doctor => unreachable_serve(),
        Command::Allow(args) => {
            let scope = cluster_scope(args.cluster.as_deref())?;
            let subject =
                Subject::allowance_row(&args.namespace, &args.service_account)?.in_cluster(scope);
            let role = RoleArn::parse(&args.role)?;
            if let Some(id) = &args.external_id {
                validate_external_id(id)?;
            }
            let session_policy = args
                .session_policy
                .as_deref()
                .map(read_session_policy)
                .transpose()?;
            warn_unless_registered(&stores, subject.cluster.as_ref()).await;
            let before = stores.aws.allowances.allowance(&subject).await?;
            let terms = RoleTerms {
                external_id: args.external_id.clone(),
                session_policy,
            };
            let row = stores
                .aws
                .allowances
                .allow_with(&subject, role.as_str(), &terms)
                .await?;
            match &args.external_id {
                Some(id) => println!("allowed {subject} to assume {role} with ExternalId {id}"),
                None => println!("allowed {subject} to assume {role}"),
            }
            if let Some(policy) = &terms.session_policy {
                println!(
                    "  with a session policy of {} characters",
                    policy.as_str().chars().count()
                );
            }
            let cleared = before
                .as_ref()
                .and_then(|b| b.external_ids.get(role.as_str()))
                .filter(|_| args.external_id.is_none());
            if let Some(old) = cleared {
                println!("  (its ExternalId {old} was removed: pass --external-id to keep one)");
            }
            let dropped = before
                .as_ref()
                .is_some_and(|b| b.session_policies.contains_key(role.as_str()))
                && terms.session_policy.is_none();
            if dropped {
                println!("  (its session policy was removed: pass --session-policy to keep one)");
            }
            print_roles(&row);
            Ok(())
        }
        Command::Disallow(args) => {
            let scope = cluster_scope(args.cluster.as_deref())?;
            let subject =
                Subject::allowance_row(&args.namespace, &args.service_account)?.in_cluster(scope);
            let role = args.role.as_deref().map(RoleArn::parse).transpose()?;
            // The default cluster's pods read both its named and its unprefixed rows: a
            // revocation must reach both, or the other one keeps granting.
            let subjects = same_pods_rows(&subject, stores.config.cluster_name.as_ref());
            let mut granting = Vec::new();
            for candidate in &subjects {
                if grants(&stores.aws.allowances, candidate, role.as_ref()).await? {
                    granting.push(candidate.clone());
                }
            }
            if granting.is_empty() {
                refuse_what_is_not_allowed(&stores.aws.allowances, &subject, role.as_ref()).await?;
            }
            for subject in &granting {
                let row = stores
                    .aws
                    .allowances
                    .disallow(subject, role.as_ref().map(RoleArn::as_str))
                    .await?;
                match (&role, &row) {
                    (Some(role), Some(row)) => {
                        println!("{subject} may no longer assume {role}");
                        print_roles(row);
                    }
                    (Some(role), None) => {
                        println!("{subject} may no longer assume {role}; it has no roles left")
                    }
                    (None, _) => println!("{subject} may no longer assume any role"),
                }
            }
            Ok(())
        }
        Command::Allowances {
            namespace,
            cluster,
            output,
        } => {
            let scope = cluster
                .as_deref()
                .map(|name| cluster_scope(Some(name)))
                .transpose()?;
            // The rows of a cluster: its named rows, and for the default cluster (named by
            // CLUSTER_NAME) also the unprefixed ones: both grant its pods.
            let default = stores.config.cluster_name.as_ref();
            let of_cluster = |row_cluster: &Option<ClusterName>, scope: &Option<ClusterName>| {
                row_cluster == scope
                    || (row_cluster.is_none() && scope.is_some() && scope.as_ref() == default)
            };
            let rows = match (&namespace, &scope) {
                (Some(namespace), scope) => {
                    let scope = scope.clone().flatten();
                    // Validated like a row, so a typo is an error rather than an empty list.
                    let subject = Subject::allowance_row(namespace, WILDCARD_SERVICE_ACCOUNT)?
                        .in_cluster(scope.clone());
                    let mut rows = Vec::new();
                    for subject in same_pods_rows(&subject, default) {
                        if subject.cluster == scope || scope.is_some() {
                            rows.extend(
                                stores
                                    .aws
                                    .allowances
                                    .list(Some(&subject.partition()))
                                    .await?,
                            );
                        }
                    }
                    rows
                }
                (None, Some(scope)) => stores
                    .aws
                    .allowances
                    .list(None)
                    .await?
                    .into_iter()
                    .filter(|row| of_cluster(&row.subject.cluster, scope))
                    .collect(),
                (None, None) => stores.aws.allowances.list(None).await?,
            };
            print_allowances(&rows, stores.config.cluster_name.as_ref(), output)
        }
        Command::Token(command) => token(&stores, command).await,
        Command::Cluster(command) => {
            crate::clusters::run(
                command,
                stores.aws.clusters.as_ref(),
                stores.config.cluster_name.as_ref(),
            )
            .await
        }
        Command::Tables(TablesCommand::Create) => {
            iam_broker_aws::schema::create_tables(
                &stores.aws.dynamodb,
                &stores.config.allowances_table,
                &stores.config.authorizations_table,
            )
            .await?;
            iam_broker_aws::schema::create_clusters_table(
                &stores.aws.dynamodb,
                &stores.config.clusters_table,
            )
            .await?;
            println!(
                "tables {}, {} and {} are ready",
                stores.config.allowances_table,
                stores.config.authorizations_table,
                stores.config.clusters_table
            );
            Ok(())
        }
    }
}

fn unreachable_serve() -> anyhow::Result<()> {
    bail!("this command is handled before the admin commands")
}

/// `disallow` of something that is not allowed is an error, not a silent success: the operator
/// most likely mistyped the namespace, the ServiceAccount or the role.
async fn refuse_what_is_not_allowed(
    allowances: &DynamoAllowanceStore,
    subject: &Subject,
    role: Option<&RoleArn>,
) -> anyhow::Result<()> {
    let row = allowances.allowance(subject).await?;
    let allowed = row.as_ref().is_some_and(|row| match role {
        Some(role) => row.allowed_roles.contains(role.as_str()),
        None => true,
    });
    if allowed {
        return Ok(());
    }
    let what = role.map_or_else(|| "any role".to_owned(), ToString::to_string);
    let mut message = match &row {
        Some(row) if !row.allowed_roles.is_empty() => format!(
            "{subject} is not allowed to assume {what}; it may assume: {}",
            row.allowed_roles
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>()
                .join(", ")
        ),
        _ if role.is_some() => {
            format!("{subject} has no allowance: it is not allowed to assume {what}")
        }
        _ => format!("{subject} has no allowance: there is nothing to disallow"),
    };
    let wildcard = subject.wildcard();
    if wildcard != *subject
        && let Some(row) = allowances.allowance(&wildcard).await?
        && role.is_none_or(|role| row.allowed_roles.contains(role.as_str()))
    {
        message.push_str(&format!(
            " (the namespace-wide allowance {wildcard} grants it: disallow it with \
             --service-account '*')"
        ));
    }
    message.push_str("; `iam-broker allowances` lists what is allowed");
    bail!(message)
}

fn print_roles(row: &Allowance) {
    for role in &row.allowed_roles {
        match row.external_ids.get(role) {
            Some(id) => println!("  {role} (ExternalId {id})"),
            None => println!("  {role}"),
        }
    }
}

/// The cluster of an allowance row: `--cluster NAME` means NAME's rows (partition
/// `NAME/<namespace>`) whatever `CLUSTER_NAME` is; without it, the default cluster's unprefixed
/// rows. The broker and the webhook read both for the default cluster when it has a name
/// (`allowance::deciding_subjects`), so either way of writing reaches its pods.
fn cluster_scope(cluster: Option<&str>) -> anyhow::Result<Option<ClusterName>> {
    cluster
        .map(ClusterName::parse)
        .transpose()
        .map_err(Into::into)
}

/// The rows that grant `subject`'s pods what `subject`'s row grants: for the default cluster
/// (named by `default`), its named and its unprefixed rows, whichever `subject` names.
fn same_pods_rows(subject: &Subject, default: Option<&ClusterName>) -> Vec<Subject> {
    match (&subject.cluster, default) {
        (None, Some(_)) => deciding_subjects(subject, default),
        (Some(cluster), Some(name)) if cluster == name => {
            vec![subject.clone(), subject.clone().in_cluster(None)]
        }
        _ => vec![subject.clone()],
    }
}

/// Whether `subject`'s own row grants `role` (any role when `None`).
async fn grants(
    allowances: &DynamoAllowanceStore,
    subject: &Subject,
    role: Option<&RoleArn>,
) -> anyhow::Result<bool> {
    Ok(allowances
        .allowance(subject)
        .await?
        .is_some_and(|row| match role {
            Some(role) => row.allowed_roles.contains(role.as_str()),
            None => true,
        }))
}

/// An allowance for a cluster nobody registered is allowed (it may be registered next), but
/// most likely a typo: say so.
async fn warn_unless_registered(stores: &Stores, cluster: Option<&ClusterName>) {
    let Some(cluster) = cluster else {
        return;
    };
    match stores.aws.clusters.cluster(cluster).await {
        Ok(Some(_)) => {}
        Ok(None) => eprintln!(
            "warning: no cluster {cluster} is registered: its pods get credentials once              `iam-broker cluster add {cluster} ...` registers it"
        ),
        Err(error) => eprintln!(
            "warning: could not check that cluster {cluster} is registered: {:#}",
            anyhow::Error::new(error)
        ),
    }
}

/// Reads and checks a session policy file (`-`: standard input).
fn read_session_policy(path: &std::path::Path) -> anyhow::Result<SessionPolicy> {
    let text = if path == std::path::Path::new("-") {
        std::io::read_to_string(std::io::stdin()).context("could not read the session policy")?
    } else {
        std::fs::read_to_string(path)
            .with_context(|| format!("could not read the session policy {}", path.display()))?
    };
    SessionPolicy::parse(&text).with_context(|| format!("--session-policy {}", path.display()))
}

/// The allowances listing. JSON rows carry `cluster` only outside the default cluster, and
/// `external_ids` and `session_policies` only when a role has one, so rows written before
/// either existed read as they always did.
fn print_allowances(
    rows: &[Allowance],
    default_cluster: Option<&ClusterName>,
    output: Output,
) -> anyhow::Result<()> {
    match output {
        Output::Json => {
            let rows: Vec<_> = rows
                .iter()
                .map(|row| {
                    let mut value = json!({
                        "namespace": row.subject.namespace,
                        "service_account": row.subject.service_account,
                        "allowed_roles": row.allowed_roles,
                    });
                    if let Some(cluster) = &row.subject.cluster {
                        value["cluster"] = json!(cluster.as_str());
                    }
                    if !row.external_ids.is_empty() {
                        value["external_ids"] = json!(row.external_ids);
                    }
                    if !row.session_policies.is_empty() {
                        value["session_policies"] = json!(row.session_policies);
                    }
                    value
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&rows)?);
        }
        Output::Table => {
            let default = default_cluster.map_or("(default)", ClusterName::as_str);
            println!(
                "{:<16} {:<24} {:<24} {:<64} {:<14} EXTERNAL ID",
                "CLUSTER", "NAMESPACE", "SERVICE ACCOUNT", "ROLE", "SESSION POLICY"
            );
            for row in rows {
                let cluster = row
                    .subject
                    .cluster
                    .as_ref()
                    .map_or(default, ClusterName::as_str);
                for role in &row.allowed_roles {
                    let policy = row.session_policies.get(role).map_or_else(
                        || "-".to_owned(),
                        |p| format!("{} chars", p.chars().count()),
                    );
                    println!(
                        "{cluster:<16} {:<24} {:<24} {role:<64} {policy:<14} {}",
                        row.subject.namespace,
                        row.subject.service_account,
                        row.external_ids.get(role).map_or("-", String::as_str)
                    );
                }
            }
        }
    }
    Ok(())
}

async fn token(stores: &Stores, command: TokenCommand) -> anyhow::Result<()> {
    match command {
        TokenCommand::Create {
            namespace,
            service_account,
            role,
            pod,
        } => {
            let subject = Subject::service_account(&namespace, &service_account)?;
            let role = RoleArn::parse(&role)?;
            let now = OffsetDateTime::now_utc();
            let (token, record) = mint(
                Grant {
                    subject: subject.clone(),
                    role_arn: role.clone(),
                    pod_name: pod,
                    secret_name: None,
                },
                now,
                stores.config.token_ttl,
            )?;
            let rows = stores
                .aws
                .allowances
                .rows_for_all(&deciding_subjects(
                    &subject,
                    stores.config.cluster_name.as_ref(),
                ))
                .await?;
            stores
                .aws
                .tokens
                .insert(&record)
                .await
                .context("could not record the token")?;
            if !is_allowed(&rows, role.as_str()) {
                match unreadable(&rows) {
                    Some(row) => eprintln!(
                        "warning: {row}; the broker will answer AllowanceUnreadable until the row \
                         is fixed or rewritten with `iam-broker allow`"
                    ),
                    None => eprintln!(
                        "warning: no allowance lets {subject} assume {role}; the broker will \
                         answer AllowanceRevoked until `iam-broker allow` grants it"
                    ),
                }
            }
            eprintln!(
                "recorded token {} for {subject} and {role}; it is printed once below and never stored",
                record.token_hash.short()
            );
            println!("{}", token.expose());
            Ok(())
        }
        TokenCommand::List { output } => {
            let records = stores.aws.tokens.list().await?;
            match output {
                Output::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &records.iter().map(record_json).collect::<Vec<_>>()
                    )?
                ),
                Output::Table => {
                    println!(
                        "{:<64} {:<20} {:<20} {:<20} {:<20} ROLE",
                        "TOKEN HASH", "NAMESPACE", "SERVICE ACCOUNT", "POD", "EXPIRES"
                    );
                    for r in &records {
                        println!(
                            "{:<64} {:<20} {:<20} {:<20} {:<20} {}",
                            r.token_hash,
                            r.subject.namespace,
                            r.subject.service_account,
                            r.pod_name.as_deref().unwrap_or("-"),
                            // A tombstone grants nothing: say so where the expiry would be.
                            if r.is_retracted() {
                                "retracted".to_owned()
                            } else {
                                rfc3339(r.expires)
                            },
                            r.role_arn
                        );
                    }
                }
            }
            Ok(())
        }
        TokenCommand::Revoke { hash, stdin } => {
            let hash = if stdin {
                let mut value = String::new();
                std::io::stdin()
                    .read_to_string(&mut value)
                    .context("could not read the token from stdin")?;
                Token::parse(value.trim())
                    .context("stdin does not hold an iam-broker token")?
                    .hash()
            } else {
                token_hash(&stores.aws.tokens, &hash.unwrap_or_default()).await?
            };
            match stores.aws.tokens.delete(&hash).await? {
                Some(record) => {
                    println!(
                        "revoked token {} of {} ({})",
                        hash.short(),
                        record.subject,
                        record.role_arn
                    );
                    Ok(())
                }
                None => bail!("no token with hash {hash}"),
            }
        }
    }
}

/// The hash `--hash` names: a full hash as is, or the one record whose hash starts with the
/// given prefix (at least as long as the prefix `token create` prints).
async fn token_hash(tokens: &DynamoTokenStore, value: &str) -> anyhow::Result<TokenHash> {
    let prefix = value.trim().to_ascii_lowercase();
    if let Some(hash) = TokenHash::parse(&prefix) {
        return Ok(hash);
    }
    let shortest = short_hash_len();
    let hex = prefix.bytes().all(|b| b.is_ascii_hexdigit());
    if !hex || prefix.len() < shortest || prefix.len() > 64 {
        bail!(
            "{value:?} is not a token hash: give the 64 hex characters `token list` shows, or at \
             least the first {shortest} that `token create` prints"
        );
    }
    let mut matches: Vec<TokenHash> = tokens
        .list()
        .await?
        .into_iter()
        .map(|record| record.token_hash)
        .filter(|hash| hash.as_str().starts_with(&prefix))
        .collect();
    match matches.len() {
        0 => bail!("no token with hash prefix {prefix}"),
        1 => Ok(matches.remove(0)),
        n => bail!(
            "hash prefix {prefix} matches {n} tokens; give more characters, or one of:\n  {}",
            matches
                .iter()
                .map(TokenHash::as_str)
                .collect::<Vec<_>>()
                .join("\n  ")
        ),
    }
}

/// How many characters of a hash `token create` prints ([`TokenHash::short`]): the shortest
/// prefix `token revoke --hash` accepts.
fn short_hash_len() -> usize {
    TokenHash::parse(&"0".repeat(64)).map_or(12, |hash| hash.short().len())
}

fn record_json(r: &TokenRecord) -> serde_json::Value {
    json!({
        "token_hash": r.token_hash.as_str(),
        "namespace": r.subject.namespace,
        "service_account": r.subject.service_account,
        "role_arn": r.role_arn.as_str(),
        "pod_name": r.pod_name,
        "secret_name": r.secret_name,
        "created_at": rfc3339(r.created_at),
        "last_used": r.last_used.map(rfc3339),
        "expires": rfc3339(r.expires),
        "retracted_at": r.retracted_at.map(rfc3339),
    })
}
