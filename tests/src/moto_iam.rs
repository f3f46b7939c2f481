//! moto's IAM API, called without an SDK (the tests crate has no IAM client): users allowed
//! given actions, roles with a trust and an inline policy. Signed as moto's root identity, so
//! only before `Moto::enforce_iam`.

use anyhow::Context as _;
use serde_json::json;

/// IAM of one moto server, signed as moto's default (root) identity.
pub struct MotoIam {
    endpoint: String,
    client: reqwest::Client,
}

impl MotoIam {
    /// IAM of the moto at `endpoint`.
    pub fn new(endpoint: &str) -> Self {
        Self {
            endpoint: endpoint.to_owned(),
            client: reqwest::Client::new(),
        }
    }

    /// One IAM Query API call; the XML answer.
    pub async fn call(&self, params: &[(&str, &str)]) -> anyhow::Result<String> {
        let mut form = vec![("Version", "2010-05-08")];
        form.extend_from_slice(params);
        let response = self
            .client
            .post(format!("{}/", self.endpoint))
            .header(
                "Authorization",
                "AWS4-HMAC-SHA256 Credential=testing/20261122/us-east-1/iam/aws4_request, SignedHeaders=host, Signature=x",
            )
            .form(&form)
            .send()
            .await?;
        let status = response.status();
        let text = response.text().await?;
        anyhow::ensure!(status.is_success(), "IAM call failed: {status}: {text}");
        Ok(text)
    }

    /// The text between `open` and `close` in an answer.
    pub fn between<'a>(text: &'a str, open: &str, close: &str) -> anyhow::Result<&'a str> {
        let start = text
            .find(open)
            .with_context(|| format!("no {open} in {text}"))?
            + open.len();
        let end = text[start..]
            .find(close)
            .with_context(|| format!("no {close} in {text}"))?;
        Ok(&text[start..start + end])
    }

    /// A user allowed `actions` on every resource; its access key and secret.
    pub async fn user(&self, name: &str, actions: &[&str]) -> anyhow::Result<(String, String)> {
        self.call(&[("Action", "CreateUser"), ("UserName", name)])
            .await?;
        let policy = json!({"Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]})
        .to_string();
        self.call(&[
            ("Action", "PutUserPolicy"),
            ("UserName", name),
            ("PolicyName", "allowed"),
            ("PolicyDocument", &policy),
        ])
        .await?;
        let created = self
            .call(&[("Action", "CreateAccessKey"), ("UserName", name)])
            .await?;
        Ok((
            Self::between(&created, "<AccessKeyId>", "</AccessKeyId>")?.to_owned(),
            Self::between(&created, "<SecretAccessKey>", "</SecretAccessKey>")?.to_owned(),
        ))
    }

    /// A role anyone in the account may assume, allowed `actions`; its ARN.
    pub async fn role(&self, name: &str, actions: &[&str]) -> anyhow::Result<String> {
        let trust = json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow",
            "Principal": {"AWS": "*"}, "Action": ["sts:AssumeRole", "sts:TagSession",
            "sts:SetSourceIdentity"]}]})
        .to_string();
        let created = self
            .call(&[
                ("Action", "CreateRole"),
                ("RoleName", name),
                ("AssumeRolePolicyDocument", &trust),
            ])
            .await?;
        let policy = json!({"Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]})
        .to_string();
        self.call(&[
            ("Action", "PutRolePolicy"),
            ("RoleName", name),
            ("PolicyName", "work"),
            ("PolicyDocument", &policy),
        ])
        .await?;
        Ok(Self::between(&created, "<Arn>", "</Arn>")?.to_owned())
    }
}
