//! `kube-api-standin`: the tests' Kubernetes API stand-in as a process, for the local run
//! (`scripts/run-local.sh`). It serves HTTPS on 127.0.0.1, writes a kubeconfig for itself, and
//! holds the ServiceAccounts given on the command line until SIGTERM / Ctrl-C.
//!
//! ```text
//! kube-api-standin [--issuer URL] [--signing-alg RS256|ES256] KUBECONFIG_OUT [NAMESPACE/NAME=ROLE_ARN ...]
//! ```
//!
//! It issues ServiceAccount tokens as kube-apiserver does: the TokenRequest API
//! (`POST /api/v1/namespaces/NS/serviceaccounts/NAME/token`), and the discovery documents
//! (`GET /.well-known/openid-configuration`, `GET /openid/v1/jwks`). `--issuer` (default
//! `https://kubernetes.default.svc.cluster.local`) is the tokens' `iss`; `--signing-alg` the
//! kind of key, generated afresh at every start. Every request needs the kubeconfig's bearer
//! token, the two control endpoints below too (they answer the new JWKS):
//!
//! ```text
//! POST /standin/v1/rotate-signing-key    a new key signs; the old one stays in the JWKS
//! POST /standin/v1/retire-previous-keys  the JWKS keeps only the current key
//! ```
#![forbid(unsafe_code)]

use anyhow::{Context as _, bail};
use iam_broker_testkit::kube_api::{
    DEFAULT_TOKEN, JWKS_PATH, KubeApi, RETIRE_PREVIOUS_KEYS_PATH, ROTATE_SIGNING_KEY_PATH,
    SigningAlgorithm, StandinOptions,
};

const USAGE: &str = "usage: kube-api-standin [--issuer URL] [--signing-alg RS256|ES256] \
                     KUBECONFIG_OUT [NAMESPACE/NAME=ROLE_ARN ...]";

/// The command line, read.
#[derive(Debug)]
struct Arguments {
    options: StandinOptions,
    kubeconfig_out: String,
    /// `(namespace, name, role ARN)` of each ServiceAccount to hold.
    service_accounts: Vec<(String, String, String)>,
}

/// What the command line asks for.
#[derive(Debug)]
enum Command {
    Run(Arguments),
    Help,
}

fn parse(args: impl IntoIterator<Item = String>) -> anyhow::Result<Command> {
    let mut options = StandinOptions::default();
    let mut positional = Vec::new();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => {
                (flag.to_owned(), Some(value.to_owned()))
            }
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| {
            inline
                .clone()
                .or_else(|| args.next())
                .with_context(|| format!("{name} needs a value\n{USAGE}"))
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "--issuer" => options.issuer = value("--issuer")?,
            "--signing-alg" => options.algorithm = value("--signing-alg")?.parse()?,
            other if other.starts_with('-') => bail!("unknown option {other}\n{USAGE}"),
            _ => positional.push(arg),
        }
    }
    let mut positional = positional.into_iter();
    let Some(kubeconfig_out) = positional.next() else {
        bail!("{USAGE}");
    };
    let service_accounts = positional
        .map(|spec| service_account(&spec))
        .collect::<anyhow::Result<_>>()?;
    Ok(Command::Run(Arguments {
        options,
        kubeconfig_out,
        service_accounts,
    }))
}

fn service_account(spec: &str) -> anyhow::Result<(String, String, String)> {
    let (account, role) = spec
        .split_once('=')
        .with_context(|| format!("{spec:?} is not NAMESPACE/NAME=ROLE_ARN"))?;
    let (namespace, name) = account
        .split_once('/')
        .with_context(|| format!("{account:?} is not NAMESPACE/NAME"))?;
    Ok((namespace.to_owned(), name.to_owned(), role.to_owned()))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let arguments = match parse(std::env::args().skip(1))? {
        Command::Help => {
            println!(
                "{USAGE}\n\n\
                 Serves the Kubernetes API stand-in over HTTPS on 127.0.0.1 and writes a kubeconfig \
                 for it.\n\n  \
                 --issuer URL            iss of the ServiceAccount tokens it issues (default {})\n  \
                 --signing-alg ALG       RS256 (RSA 2048, the default) or ES256 (P-256)\n\n\
                 Token issuing: POST /api/v1/namespaces/NS/serviceaccounts/NAME/token (TokenRequest),\n\
                 GET /.well-known/openid-configuration, GET {JWKS_PATH}.\n\
                 Key rotation, with the kubeconfig's bearer token:\n  \
                 POST {ROTATE_SIGNING_KEY_PATH}    a new key signs; the old one stays in the JWKS\n  \
                 POST {RETIRE_PREVIOUS_KEYS_PATH}  the JWKS keeps only the current key",
                StandinOptions::default().issuer
            );
            return Ok(());
        }
        Command::Run(arguments) => arguments,
    };
    let algorithm: SigningAlgorithm = arguments.options.algorithm;
    let api = KubeApi::start_with(arguments.options).await?;
    for (namespace, name, role) in &arguments.service_accounts {
        api.put_service_account(namespace, name, &[("eks.amazonaws.com/role-arn", role)]);
    }
    // The key now, not at the first request: scripts wait for the kubeconfig, not for RSA.
    let kid = api.signing_key_id()?;
    let out = &arguments.kubeconfig_out;
    std::fs::write(out, api.kubeconfig(DEFAULT_TOKEN))
        .with_context(|| format!("cannot write {out}"))?;
    eprintln!(
        "Kubernetes API stand-in on {} (kubeconfig: {out}); issuer {}, {algorithm} key {kid}",
        api.url,
        api.issuer(),
    );
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Vec<String> {
        line.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn the_old_command_line_still_works() {
        let Command::Run(run) = parse(args("/tmp/kc team-a/app=arn:aws:iam::1:role/r")).unwrap()
        else {
            panic!("not a run");
        };
        assert_eq!(run.kubeconfig_out, "/tmp/kc");
        assert_eq!(run.options, StandinOptions::default());
        assert_eq!(
            run.service_accounts,
            [(
                "team-a".to_owned(),
                "app".to_owned(),
                "arn:aws:iam::1:role/r".to_owned()
            )]
        );
    }

    #[test]
    fn issuer_and_algorithm_are_flags() {
        let Command::Run(run) = parse(args(
            "--issuer https://oidc.example --signing-alg=ES256 /tmp/kc",
        ))
        .unwrap() else {
            panic!("not a run");
        };
        assert_eq!(run.options.issuer, "https://oidc.example");
        assert_eq!(run.options.algorithm, SigningAlgorithm::Es256);
        assert!(parse(args("--signing-alg HS256 /tmp/kc")).is_err());
        assert!(parse(args("--issuer")).is_err());
        assert!(parse(args("--bogus /tmp/kc")).is_err());
        assert!(parse(args("")).is_err());
        assert!(matches!(parse(args("--help")).unwrap(), Command::Help));
    }
}
