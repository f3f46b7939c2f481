//! `kube-api-standin`: the tests' Kubernetes API stand-in as a process, for the local run
//! (`scripts/run-local.sh`). It serves HTTPS on 127.0.0.1, writes a kubeconfig for itself, and
//! holds the ServiceAccounts given on the command line until SIGTERM / Ctrl-C.
//!
//! ```text
//! kube-api-standin KUBECONFIG_OUT [NAMESPACE/NAME=ROLE_ARN ...]
//! ```
#![forbid(unsafe_code)]

use anyhow::{Context as _, bail};
use iam_broker_tests::kube_api::{DEFAULT_TOKEN, KubeApi};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let Some(out) = args.next() else {
        bail!("usage: kube-api-standin KUBECONFIG_OUT [NAMESPACE/NAME=ROLE_ARN ...]");
    };
    let api = KubeApi::start().await?;
    for spec in args {
        let (account, role) = spec
            .split_once('=')
            .with_context(|| format!("{spec:?} is not NAMESPACE/NAME=ROLE_ARN"))?;
        let (namespace, name) = account
            .split_once('/')
            .with_context(|| format!("{account:?} is not NAMESPACE/NAME"))?;
        api.put_service_account(namespace, name, &[("eks.amazonaws.com/role-arn", role)]);
    }
    std::fs::write(&out, api.kubeconfig(DEFAULT_TOKEN))
        .with_context(|| format!("cannot write {out}"))?;
    eprintln!("Kubernetes API stand-in on {} (kubeconfig: {out})", api.url);
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    Ok(())
}
