//! Administration commands: allowances, tokens, tables.

use std::io::Read as _;

use anyhow::{Context as _, bail};
use iam_broker_aws::{DynamoAllowanceStore, DynamoTokenStore};
use iam_broker_core::allowance::{Allowance, RoleArn, Subject, is_allowed};
use iam_broker_core::broker::{Grant, mint};
use iam_broker_core::ports::{AllowanceStore, TokenStore};
use iam_broker_core::{Config, Token, TokenHash, TokenRecord};
use serde_json::json;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::{Command, Output, TablesCommand, TokenCommand};

struct Stores {
    config: Config,
    dynamodb: aws_sdk_dynamodb::Client,
    allowances: DynamoAllowanceStore,
    tokens: DynamoTokenStore,
}

async fn stores() -> anyhow::Result<Stores> {
    let config = Config::from_env()?;
    let sdk = iam_broker_aws::load_sdk_config(config.aws_call_timeout).await;
    let dynamodb = aws_sdk_dynamodb::Client::new(&sdk);
    Ok(Stores {
        allowances: DynamoAllowanceStore::new(dynamodb.clone(), &config.allowances_table),
        tokens: DynamoTokenStore::new(dynamodb.clone(), &config.authorizations_table),
        dynamodb,
        config,
    })
}

/// Runs every command but `serve`.
pub async fn run(command: Command) -> anyhow::Result<()> {
    let stores = stores().await?;
    match command {
        Command::Serve { .. }
        | Command::RenderWebhook(_)
        | Command::Credentials(_)
        | Command::Sweep(_)
        | Command::Kubeconfig(_)
        | Command::Doctor => unreachable_serve(),
        Command::Allow(args) => {
            let subject = Subject::new(&args.namespace, &args.service_account, true)?;
            let role = RoleArn::parse(&args.role)?;
            let row = stores.allowances.allow(&subject, role.as_str()).await?;
            println!("allowed {} to assume {}", subject, role);
            print_roles(&row);
            Ok(())
        }
        Command::Disallow(args) => {
            let subject = Subject::new(&args.namespace, &args.service_account, true)?;
            let role = args.role.as_deref().map(RoleArn::parse).transpose()?;
            let row = stores
                .allowances
                .disallow(&subject, role.as_ref().map(RoleArn::as_str))
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
            Ok(())
        }
        Command::Allowances { namespace, output } => {
            let rows = stores.allowances.list(namespace.as_deref()).await?;
            match output {
                Output::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &rows
                            .iter()
                            .map(|row| json!({
                                "namespace": row.subject.namespace,
                                "service_account": row.subject.service_account,
                                "allowed_roles": row.allowed_roles,
                            }))
                            .collect::<Vec<_>>()
                    )?
                ),
                Output::Table => {
                    println!("{:<24} {:<24} ROLE", "NAMESPACE", "SERVICE ACCOUNT");
                    for row in &rows {
                        for role in &row.allowed_roles {
                            println!(
                                "{:<24} {:<24} {role}",
                                row.subject.namespace, row.subject.service_account
                            );
                        }
                    }
                }
            }
            Ok(())
        }
        Command::Token(command) => token(&stores, command).await,
        Command::Tables(TablesCommand::Create) => {
            iam_broker_aws::schema::create_tables(
                &stores.dynamodb,
                &stores.config.allowances_table,
                &stores.config.authorizations_table,
            )
            .await?;
            println!(
                "tables {} and {} are ready",
                stores.config.allowances_table, stores.config.authorizations_table
            );
            Ok(())
        }
    }
}

fn unreachable_serve() -> anyhow::Result<()> {
    bail!("this command is handled before the admin commands")
}

fn print_roles(row: &Allowance) {
    for role in &row.allowed_roles {
        println!("  {role}");
    }
}

async fn token(stores: &Stores, command: TokenCommand) -> anyhow::Result<()> {
    match command {
        TokenCommand::Create {
            namespace,
            service_account,
            role,
            pod,
        } => {
            let subject = Subject::new(&namespace, &service_account, false)?;
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
            let wildcard_subject = subject.wildcard();
            let (exact, wildcard) = tokio::try_join!(
                stores.allowances.allowance(&subject),
                stores.allowances.allowance(&wildcard_subject),
            )?;
            stores
                .tokens
                .insert(&record)
                .await
                .context("could not record the token")?;
            if !is_allowed(&[exact, wildcard], role.as_str()) {
                eprintln!(
                    "warning: no allowance lets {subject} assume {role}; the broker will answer \
                     AllowanceRevoked until `iam-broker allow` grants it"
                );
            }
            eprintln!(
                "recorded token {} for {subject} and {role}; it is printed once below and never stored",
                record.token_hash.short()
            );
            println!("{}", token.expose());
            Ok(())
        }
        TokenCommand::List { output } => {
            let records = stores.tokens.list().await?;
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
                            epoch(r.expires),
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
                let value = hash.unwrap_or_default();
                TokenHash::parse(&value).with_context(|| {
                    format!("{value:?} is not a token hash (64 lowercase hex characters)")
                })?
            };
            match stores.tokens.delete(&hash).await? {
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

fn epoch(seconds: i64) -> String {
    OffsetDateTime::from_unix_timestamp(seconds)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| seconds.to_string())
}

fn record_json(r: &TokenRecord) -> serde_json::Value {
    json!({
        "token_hash": r.token_hash.as_str(),
        "namespace": r.subject.namespace,
        "service_account": r.subject.service_account,
        "role_arn": r.role_arn,
        "pod_name": r.pod_name,
        "secret_name": r.secret_name,
        "created_at": epoch(r.created_at),
        "last_used": r.last_used.map(epoch),
        "expires": epoch(r.expires),
    })
}
