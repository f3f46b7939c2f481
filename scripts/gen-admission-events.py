#!/usr/bin/env python3
"""Writes the admission fixtures in events/: API Gateway REST (v1 proxy) events whose body is an
AdmissionReview, as the API server sends it. Re-run after changing a pod below:

    python3 scripts/gen-admission-events.py
"""
import copy
import json
import pathlib
import subprocess

ROOT = pathlib.Path(__file__).resolve().parent.parent
EVENTS = ROOT / "events"
# Not secret: this token exists only in the test fixtures.
FIXTURE_TOKEN = "iamb_AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA"
# The token's hash and its Secret's name, as the webhook derives them (the Rust code, not a copy).
_DERIVED = json.loads(subprocess.run(
    ["cargo", "run", "--quiet", "--locked", "--example", "token-secret",
     "--", FIXTURE_TOKEN],
    cwd=ROOT, check=True, capture_output=True, text=True,
).stdout)
FIXTURE_HASH = _DERIVED["token_hash"]
FIXTURE_SECRET_NAME = _DERIVED["secret_name"]
HOST = "abcdef1234.execute-api.us-east-1.amazonaws.com"
# Not secret: the webhook path secret of the fixtures only.
FIXTURE_PATH_SECRET = "fixture-path-secret-0123456789abcdef"


def pod(**spec_extra):
    spec = {
        "serviceAccountName": "app",
        "containers": [{"name": "app", "image": "public.ecr.aws/aws-cli/aws-cli:latest"}],
    }
    spec.update(spec_extra)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web-1", "namespace": "team-a", "labels": {"app": "web"}},
        "spec": spec,
    }


def review(obj, operation="CREATE", version="admission.k8s.io/v1", dry_run=False, old=None):
    name = obj["metadata"].get("name", "") if obj else old["metadata"].get("name", "")
    return {
        "apiVersion": version,
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "name": name,
            "namespace": "team-a",
            "operation": operation,
            "userInfo": {
                "username": "system:serviceaccount:kube-system:replicaset-controller",
                "groups": ["system:serviceaccounts", "system:authenticated"],
            },
            "object": obj,
            "oldObject": old,
            "dryRun": dry_run,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": f"{operation.title()}Options"},
        },
    }


def event(body, path="/"):
    headers = {
        "Host": HOST,
        "User-Agent": "kube-apiserver-admission",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Port": "443",
        "Content-Type": "application/json",
    }
    return {
        "resource": "/mutate/{secret}" if path != "/" else "/",
        "path": path,
        "httpMethod": "POST",
        "headers": headers,
        "multiValueHeaders": {k: [v] for k, v in headers.items()},
        "queryStringParameters": None,
        "multiValueQueryStringParameters": None,
        "pathParameters": {"secret": path.rsplit("/", 1)[1]} if path != "/" else None,
        "stageVariables": None,
        "requestContext": {
            "accountId": "123456789012",
            "apiId": "abcdef1234",
            "resourceId": "a1b2c3",
            "resourcePath": "/mutate/{secret}" if path != "/" else "/",
            "httpMethod": "POST",
            "path": "/Prod" + path,
            "protocol": "HTTP/1.1",
            "stage": "Prod",
            "requestId": "c6af9ac6-7b61-11e6-9a41-93e8deadbeef",
            "requestTimeEpoch": 1795000000000,
            "identity": {"sourceIp": "203.0.113.10", "userAgent": "kube-apiserver-admission"},
            "domainName": HOST,
        },
        "body": body if isinstance(body, str) else json.dumps(body),
        "isBase64Encoded": False,
    }


def generate_name():
    p = pod()
    del p["metadata"]["name"]
    p["metadata"]["generateName"] = "web-7d9f8b6c4-"
    return p


def with_init_containers():
    return pod(initContainers=[
        {"name": "migrate", "image": "migrate:1"},
        {"name": "log-shipper", "image": "fluent-bit:3", "restartPolicy": "Always"},
    ])


def skip_containers():
    p = pod(containers=[
        {"name": "app", "image": "app:1"},
        {"name": "istio-proxy", "image": "istio/proxyv2:1.24"},
    ])
    p["metadata"]["annotations"] = {"eks.amazonaws.com/skip-containers": "istio-proxy"}
    return p


def preset_env():
    return pod(containers=[
        {"name": "app", "image": "app:1"},
        {"name": "legacy", "image": "legacy:1",
         "env": [{"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": "keys", "key": "id"}}}]},
        {"name": "ecs", "image": "ecs:1",
         "env": [{"name": "AWS_CONTAINER_CREDENTIALS_FULL_URI", "value": "http://169.254.170.23/v1/credentials"}]},
    ])


def injected():
    """The pod as it is stored after injection (what DELETE sends as oldObject)."""
    p = pod()
    p["metadata"]["annotations"] = {
        "iam-broker.io/secret-name": FIXTURE_SECRET_NAME,
        "iam-broker.io/token-hash": FIXTURE_HASH,
    }
    p["metadata"]["uid"] = "0b1c5a3e-1f2d-4c6b-9a8e-7d6c5b4a3f21"
    p["spec"]["containers"].append({"name": "iam-broker-proxy", "image": "iam-broker-proxy:0.1.0"})
    return p


FIXTURES = {
    "admission-create.json": review(pod()),
    "admission-create-generate-name.json": review(generate_name()),
    "admission-create-dry-run.json": review(pod(), dry_run=True),
    "admission-create-v1beta1.json": review(pod(), version="admission.k8s.io/v1beta1"),
    "admission-create-init-containers.json": review(with_init_containers()),
    "admission-create-skip-containers.json": review(skip_containers()),
    "admission-create-preset-aws-env.json": review(preset_env()),
    "admission-create-host-network.json": review(pod(hostNetwork=True)),
    "admission-create-reinvocation.json": review(injected()),
    "admission-delete.json": review(None, operation="DELETE", old=injected()),
    "admission-bad-request.json": json.dumps({"apiVersion": "v1", "kind": "Pod"}),
}

# API Gateway delivers admissions at /mutate/{secret} (template.yaml routes nothing else to the
# webhook), so the fixtures do too; two show what strangers get.
SECRET_PATH = "/mutate/" + FIXTURE_PATH_SECRET
PATHS = {
    "admission-create-root-path.json": "/",
    "admission-create-wrong-secret-path.json": "/mutate/" + "x" * len(FIXTURE_PATH_SECRET),
}
FIXTURES["admission-create-secret-path.json"] = review(pod())
FIXTURES["admission-create-root-path.json"] = review(pod())
FIXTURES["admission-create-wrong-secret-path.json"] = review(pod())

for name, body in FIXTURES.items():
    (EVENTS / name).write_text(json.dumps(event(body, PATHS.get(name, SECRET_PATH)), indent=2) + "\n")
    print("wrote", EVENTS / name)
