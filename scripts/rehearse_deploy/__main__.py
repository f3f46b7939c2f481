"""Deploy rehearsal: README's Deploy → wire → first pod → validate path, without an AWS account.

    python -m rehearse_deploy --root . --bin target/debug --moto-server scripts/moto-iam-server.py

Two stacks in one moto, against one Kubernetes API stand-in: README's secret-mode path (items 1
to 8, and the move to projected), then README's projected-first path (item 9). Each path's
operator steps are README's own code blocks (marked `<!-- rehearsed: secret -->`,
`secret-to-projected`, `projected-first`), run as written in one fresh shell per path
(readme_shell.py: the real `iam-broker`; `sam` and `kubectl` played by this script, in
`shell_command`); between a path's blocks, this script plays the cluster and the pods.

1. template.yaml, with the parameters README's secret-mode `sam deploy` passes
   (KubeconfigParameterName, ProxyImage, a fresh WebhookPathSecret; in the region and under the
   stack name its block exports), is expanded by the SAM translator. The parameters must pass
   what CloudFormation checks before it creates anything (each parameter's constraints, then the
   template's Rules); without KubeconfigParameterName the Rules refuse a secret-mode stack.
2. In moto with IAM enforcement on (INITIAL_NO_AUTH_ACTION_COUNT), the rehearsal creates what the
   code depends on, from the expanded template: the three tables as their properties say, each
   function's execution role with its policies, the stack's outputs (DescribeStacks; an output
   with a Condition only when it holds).
3. Each AWS::Lambda::Function runs the real `bootstrap` under a Lambda Runtime API emulator, with
   its resolved Environment.Variables and its role's session credentials, behind an API Gateway
   emulator routed by the expanded swagger.
4. README's Secret mode block runs as written: sam deploy; kubectl apply of the namespace, the
   webhook's identity and its RBAC; kubeconfig --store; doctor; allow; kubectl annotate sa (of the
   application's ServiceAccount, which this script created); render-webhook | kubectl apply -f -.
   The Kubernetes API stand-in plays the cluster; this script plays the API server (it calls the
   registered webhook and applies the patch) and the kubelet (it starts the sidecar and the app
   container with the env the patch gave them). The app container is `aws sts
   get-caller-identity`.
5. Direct injection, secret mode: a pod annotated `iam-broker.io/injection: direct` gets no
   sidecar; its app container is pointed at the stack's BrokerUrl itself, with the token from its
   Secret. The kubelet runs it three times, one process per SDK, each fetching over HTTPS from
   the Lambda path: the AWS CLI (botocore), the AWS SDK for Rust (`sdk-whoami`) and the AWS SDK
   for JavaScript v3 (`node tests/js/whoami.mjs`). Each trusts the TLS listener's CA as a pod
   image would (`SSL_CERT_FILE`; `NODE_EXTRA_CA_CERTS`; certifi's bundle with the CA appended,
   since botocore's container fetcher reads no variable); the BrokerFunction's log shows one
   `"cache":"miss"` (one AssumeRole) for the pod and `"cache":"hit"` for its other fetches, and
   the AWS CLI without the CA is refused at the handshake.
6. Projected identity: README's "Moving from secret to projected" block 1, in the same shell,
   registers the cluster from its API server with the identity of
   deploy/components/issuer-discovery/25-issuer-discovery.yaml (`iam-broker cluster add
   --kubeconfig`); on the still secret-mode stack, a pod's projected ServiceAccount token
   (TokenRequest, bound to the pod) gets credentials from the broker, whose role reads the
   Clusters table with dynamodb:Scan. Then direct: the token in a file, the three
   SDKs at `BrokerUrl?role=<role>` with `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE` get the role;
   the kubelet rotates the file (a fresh TokenRequest) and the next fetches are still served.
7. Least privilege, proven: every call the functions make is allowed; the broker's role cannot
   read SSM or write Allowances or the Clusters table; the webhook's and the cleanup's roles
   cannot read the Clusters table; the webhook's role cannot call STS; a role outside
   AllowedRoleArnPattern gets 502 AssumeRoleFailed.
8. Day-2 operations: the template's CloudWatch dashboard and alarms are created (CloudWatch
   PutDashboard / PutMetricAlarm, as resolved from the expanded template) and read back: every
   `iam-broker` metric the dashboard or an alarm reads is one the functions write, under exactly
   the one dimension they write it with (`cloudwatch.EMF`); the dashboard shows every such
   metric, the functions' Lambda metrics and the API's; the alarms cover the API 5xx rate,
   AssumeRoleFailed, STS throttling, the broker's p99 duration and corrupt rows, treat missing
   data as not breaching and notify AlarmTopicArn only when it is set. At the end, the EMF lines
   the functions wrote on stdout during the rehearsal are read back: each is one the dashboard
   knows, and the metrics this path exercises (CredentialsServed, Admissions, CredentialsDenied
   with Code AssumeRoleFailed, ...) are among them.
   Before that, the rest of README's "Moving from secret to projected" on this stack, its
   blocks 2 and 3 as written: redeployed with IdentityMode=projected and ClusterName, the
   kubeconfig kept, the functions restart with their new environment; a new pod gets a projected
   token for its ServiceAccount's annotated role, the registration stays the secret-mode one
   (`render-webhook --identity-mode secret` renders it again); this script restarts the
   secret-mode pods, the DELETE of each removes its Secret, so README's `kubectl get secrets -l`
   lists none, and then `render-webhook` (the IdentityMode output) registers Pod CREATE only.
9. README's projected-first path (Deploy, steps 1 to 4) on a second stack, the first deleted
   (both paths deploy README's one stack name in README's one region): its marked code blocks
   run as written, as one script in a fresh shell: `sam deploy` with IdentityMode=projected,
   ClusterName and no KubeconfigParameterName, in README's region; `cluster add` from the
   issuer-discovery identity; `doctor` (the registration, Kubernetes not called); `allow
   --cluster`; `render-webhook` last, projected from the IdentityMode output. Then: the stack has no
   CleanupFunction, no KubeconfigParameterName output, a webhook with no kubeconfig whose role
   only reads Allowances (SSM and token records denied); the cluster got the namespace and the
   issuer-discovery identity only, and a CREATE-only registration with sideEffects None. Step 5:
   a pod of a ServiceAccount allowed one role, unannotated, is patched (projected token volume,
   the sidecar at BrokerUrl?role=) and, with the token of the kubelet's TokenRequest in its file,
   `aws sts get-caller-identity` through the sidecar is that role; a ServiceAccount allowed two
   roles and annotated in the cluster: its unannotated pod is skipped with the warning naming
   iam-broker.io/role-arn and no Event (the webhook read neither the ServiceAccount nor wrote
   anything), its pod annotated with the second role gets that one. The two functions log no
   AccessDenied and no warning.

Three translations stand in for the network only: the stack's https://<api>.execute-api... URLs
reach the API Gateway emulator on 127.0.0.1, over plain http for the rehearsal and the sidecar
(`local_url`) and over TLS, with a certificate from a CA made for the run, for the SDKs of a
direct pod (`local_tls_url`: the stand-in for DNS and API Gateway's public certificate); and the
pod's 127.0.0.1:<ProxyPort> is a free port on this machine.
"""

import argparse
import base64
import glob
import json
import os
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request

import boto3
import botocore.exceptions
import jsonpatch
import yaml

from . import cfn, cloudwatch, readme_shell
from .lambda_emulator import Function, InvocationError, RestApi, http_request

NAMESPACE = "app1"
ALLOWED_ROLE_NAME = "s3_reader"
ASSUMED_ROLE = f":assumed-role/{ALLOWED_ROLE_NAME}/"
DIRECT = {"iam-broker.io/injection": "direct"}
OUTSIDE_ROLE_NAME = "legacy_reader"  # created at / (no path): outside AllowedRoleArnPattern
# deploy/'s manifests, as README's commands name them
MANIFESTS = {
    "namespace": "deploy/base/00-namespace.yaml",
    "webhook identity": "deploy/components/webhook-identity/10-serviceaccount.yaml",
    "secret RBAC": "deploy/components/rbac-secret/20-rbac.yaml",
    "issuer discovery": "deploy/components/issuer-discovery/25-issuer-discovery.yaml",
}
# the Secrets of secret-mode pods, as README's `kubectl get secrets -l` selects them
MANAGED_SECRETS = "app.kubernetes.io/managed-by=iam-broker"


class RehearsalFailed(Exception):
    pass


def step(text):
    print(f"\033[1m==> {text}\033[0m", file=sys.stderr, flush=True)


def check(condition, message):
    if not condition:
        raise RehearsalFailed(message)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, what, seconds=30):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if predicate():
                return
        except Exception:  # noqa: BLE001 - anything short of success means "not yet"
            pass
        time.sleep(0.1)
    raise RehearsalFailed(f"{what} did not come up within {seconds}s")


def denied(call, codes=("AccessDenied", "AccessDeniedException")):
    """True when the call fails with an IAM AccessDenied (or one of `codes`)."""
    try:
        call()
    except botocore.exceptions.ClientError as error:
        code = error.response.get("Error", {}).get("Code", "")
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status == 403 and "<Code>AccessDenied</Code>" in str(error):
            # moto answers JSON-protocol services (DynamoDB, SSM) with its XML error body
            code = "AccessDenied"
        if code not in codes:
            print(f"    (expected one of {codes}, got {code}: {error})", file=sys.stderr)
        return code in codes
    print("    (the call succeeded)", file=sys.stderr)
    return False


def in_order(text, commands):
    """Whether each of `commands` occurs in `text`, in this order."""
    at = [text.find(command) for command in commands]
    return -1 not in at and at == sorted(at)


def doctor_said_ok(transcript, line):
    """Whether `iam-broker doctor`, in a README script's transcript, printed `ok  <line>`."""
    return re.search(rf"^\s*ok\s+{re.escape(line)}", transcript, re.M) is not None


class Rehearsal:
    """The secret-mode stack (README: *Secret mode*), projected identity on the same stack, and
    its move to projected (*Moving from secret to projected*): README's blocks run as written in
    one operator's shell, the rehearsal playing the cluster and the pods between them."""

    # IAM's (global) region until README's `sam deploy` names the stack's region and name
    region = "us-east-1"
    stack = None

    def __init__(self, args, work):
        self.args = args
        self.work = work
        self.root = os.path.abspath(args.root)
        self.bin = os.path.abspath(args.bin)
        self.processes = []
        self.functions = {}
        self.api = None
        self.outputs = {}  # DescribeStacks' outputs, once README's `sam deploy` created the stack
        self.shell = None  # the operator's shell (readme_shell.Shell), at README's first block
        self.namespace_labels = {}
        self.applied_files = []  # what README's `kubectl apply -f` applied, checkout-relative
        self.registration = None  # the MutatingWebhookConfiguration the cluster holds
        self.listed_secrets = None  # what README's last `kubectl get secrets` listed

    # ------------------------------------------------------------------ infrastructure
    def spawn(self, argv, log, env=None):
        handle = open(os.path.join(self.work, log), "ab")
        process = subprocess.Popen(argv, env=env, stdout=handle, stderr=handle)
        self.processes.append(process)
        return process

    def stop(self):
        if self.shell:
            self.shell.close()
        for function in self.functions.values():
            function.stop()
        if self.api:
            self.api.stop()
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()

    def start_moto(self):
        port = free_port()
        env = dict(os.environ)
        # CreateUser, PutUserPolicy and CreateAccessKey of the rehearsal's administrator are the
        # only unauthenticated calls; from then on every request is signed and authorized.
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = "3"
        env["MOTO_IAM_LOAD_MANAGED_POLICIES"] = "true"
        self.spawn([sys.executable, self.args.moto_server, "-H", "127.0.0.1", "-p", str(port)],
                   "moto.log", env)
        self.endpoint = f"http://127.0.0.1:{port}"
        wait_for(lambda: urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1),
                 "moto")

    def client(self, service, credentials):
        return boto3.client(service, region_name=self.region, endpoint_url=self.endpoint,
                            aws_access_key_id=credentials["AccessKeyId"],
                            aws_secret_access_key=credentials["SecretAccessKey"],
                            aws_session_token=credentials.get("SessionToken"))

    def bootstrap_identities(self):
        anonymous = {"AccessKeyId": "AKIABOOTSTRAP0000000", "SecretAccessKey": "bootstrap"}
        iam = self.client("iam", anonymous)
        iam.create_user(UserName="rehearsal-admin")
        iam.put_user_policy(UserName="rehearsal-admin", PolicyName="admin", PolicyDocument=json.dumps(
            {"Version": "2012-10-17",
             "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="rehearsal-admin")["AccessKey"]
        self.admin = {"AccessKeyId": key["AccessKeyId"], "SecretAccessKey": key["SecretAccessKey"]}
        iam = self.client("iam", self.admin)
        check(denied(lambda: self.client("iam", anonymous).list_users(),
                     ("InvalidClientTokenId", "AccessDenied")),
              "moto is not enforcing IAM (an unsigned caller could list users)")
        # Where AWS Lambda assumes a function's execution role, the rehearsal signs as this
        # user; scripts/moto-iam-server.py lets it match the `lambda.amazonaws.com` principal.
        iam.create_user(UserName="lambda.amazonaws.com", Path="/service-principal/")
        iam.put_user_policy(UserName="lambda.amazonaws.com", PolicyName="assume",
                            PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [
                                {"Effect": "Allow", "Action": "sts:AssumeRole", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="lambda.amazonaws.com")["AccessKey"]
        self.lambda_service = {"AccessKeyId": key["AccessKeyId"],
                               "SecretAccessKey": key["SecretAccessKey"]}

    def start_cluster(self):
        self.admin_kubeconfig = os.path.join(self.work, "admin-kubeconfig")
        self.spawn([os.path.join(self.bin, "kube-api-standin"), self.admin_kubeconfig], "kube.log")
        wait_for(lambda: os.path.getsize(self.admin_kubeconfig) > 0, "the Kubernetes API stand-in")
        config = yaml.safe_load(open(self.admin_kubeconfig))
        self.kube_server = config["clusters"][0]["cluster"]["server"]
        self.kube_ca = base64.b64decode(
            config["clusters"][0]["cluster"]["certificate-authority-data"]).decode()
        self.kube_token = config["users"][0]["user"]["token"]
        self.kube_tls = ssl.create_default_context(cadata=self.kube_ca)

    def kube(self, method, path, body=None):
        request = urllib.request.Request(
            self.kube_server + path, method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": f"Bearer {self.kube_token}",
                     "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, context=self.kube_tls, timeout=10) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as error:
            return error.code, json.load(error)

    def function_with_arn(self, arn):
        return next(f for f in self.functions.values()
                    if self.resolver.attributes[(f.logical, "Arn")] == arn)

    def function_named(self, name):
        return next(f for f in self.functions.values() if f.name == name or
                    self.resolver.attributes[(f.logical, "Arn")] == name)

    def kubectl_apply(self, path=None, documents=None):
        """`kubectl apply -f` (a file, or `documents` from stdin) for the kinds the stand-in
        serves, and the webhook registration, which this script plays the API server for (the
        rest is RBAC and the namespace, which the stand-in does not model)."""
        applied = []
        for document in documents if documents is not None else yaml.safe_load_all(open(path)):
            if not document:
                continue
            kind = document["kind"]
            if kind == "MutatingWebhookConfiguration":
                self.registration = document
                applied.append(f"{kind} {document['metadata']['name']}")
                continue
            resource = {"ServiceAccount": "serviceaccounts", "Secret": "secrets"}.get(kind)
            if resource is None:
                continue
            namespace = document["metadata"]["namespace"]
            if document.get("type") == "kubernetes.io/service-account-token":
                # the token controller fills in what the API server would
                document["data"] = {
                    "token": base64.b64encode(self.kube_token.encode()).decode(),
                    "ca.crt": base64.b64encode(self.kube_ca.encode()).decode(),
                    "namespace": base64.b64encode(namespace.encode()).decode(),
                }
            status, answer = self.kube("POST", f"/api/v1/namespaces/{namespace}/{resource}", document)
            # applied before (the first stack's steps): kubectl apply leaves it as it is
            check(status in (201, 409), f"kubectl apply {kind} {namespace}: {status} {answer}")
            applied.append(f"{kind} {namespace}/{document['metadata']['name']}"
                           + (" (unchanged)" if status == 409 else ""))
        return applied

    # ------------------------------------------------------------------ the stack
    def expanded_template(self, parameters):
        return cfn.expand(cfn.load_template(os.path.join(self.root, "template.yaml")), parameters,
                          self.region, "s3://iam-broker-artifacts/bootstrap.zip")

    def expand_checked(self, parameters):
        """The template expanded with `parameters`, once CloudFormation would accept them (their
        constraints, then the Rules)."""
        self.parameters = parameters
        self.path_secret = parameters["WebhookPathSecret"]
        self.expanded = self.expanded_template(parameters)
        with open(os.path.join(self.work, "expanded.json"), "w") as f:
            json.dump(self.expanded, f, indent=1, default=str)
        refusals = (cfn.parameter_refusals(self.expanded, parameters)
                    or cfn.rule_refusals(self.expanded, parameters))
        check(not refusals, "CloudFormation would refuse the stack:\n    " + "\n    ".join(refusals))

    def active_by_type(self):
        by_type = {}
        for logical, resource in self.expanded["Resources"].items():
            if self.resolver.active(logical):
                by_type.setdefault(resource["Type"], []).append(logical)
        return by_type

    def publish_outputs(self, create):
        """The template's outputs, as DescribeStacks shows them. moto's CloudFormation cannot
        create this template's API Gateway stage, Lambda functions or schedules; the stack it
        holds carries the outputs the template computes (resolved from the resources created
        through the service APIs, the dashboard and the alarms through CloudWatch's)."""
        # an output with a Condition exists only when it holds (ClusterName, KubeconfigParameterName)
        self.outputs = {k: str(self.resolver.resolve(v["Value"]))
                        for k, v in self.expanded.get("Outputs", {}).items()
                        if "Condition" not in v or self.resolver.condition(v["Condition"])}
        cloudformation = self.client("cloudformation", self.admin)
        (cloudformation.create_stack if create else cloudformation.update_stack)(
            StackName=self.stack, TemplateBody=json.dumps({
                "Resources": {"Placeholder": {"Type": "AWS::CloudFormation::WaitConditionHandle"}},
                "Outputs": {k: {"Value": v} for k, v in self.outputs.items()},
            }))
        described = cloudformation.describe_stacks(StackName=self.stack)["Stacks"][0].get("Outputs", [])
        check({o["OutputKey"]: o["OutputValue"] for o in described} == self.outputs,
              "DescribeStacks does not return the template's outputs")

    def update_stack(self, parameters):
        """`sam deploy` of the deployed stack with other parameters: the resources stay (this
        rehearsal's updates add or remove none), the functions restart with their new
        environment, the outputs follow."""
        before = self.active_by_type()
        physical, attributes = self.resolver.physical, self.resolver.attributes
        self.expand_checked(parameters)
        self.resolver = cfn.Resolver(self.expanded, parameters, self.stack, self.region)
        self.resolver.physical, self.resolver.attributes = physical, attributes
        by_type = self.active_by_type()
        check(by_type == before, f"the update would change the stack's resources: {by_type}")
        for function in self.functions.values():
            function.stop()
        self.api.stop()
        self.functions = {}
        self.start_functions(by_type)
        self.publish_outputs(create=False)

    def deploy_stack(self, parameters):
        """`sam deploy` with `parameters` (its --parameter-overrides): the template's Rules must
        hold, as CloudFormation checks them first; then what the stack creates."""
        self.expand_checked(parameters)
        self.resolver = cfn.Resolver(self.expanded, parameters, self.stack, self.region)
        resources = self.expanded["Resources"]
        by_type = self.active_by_type()
        # the cleanup function (Secrets of secret-mode pods) exists only with a kubeconfig
        kubeconfig = bool(self.resolver.parameters["KubeconfigParameterName"])
        expected = {"AWS::DynamoDB::Table": 3, "AWS::Lambda::Function": 3 if kubeconfig else 2,
                    "AWS::ApiGateway::RestApi": 1, "AWS::CloudWatch::Dashboard": 1,
                    "AWS::CloudWatch::Alarm": 5}
        for kind, count in expected.items():
            check(len(by_type.get(kind, [])) == count,
                  f"the expanded template has {len(by_type.get(kind, []))} {kind}, expected {count}")
        admin = self.client
        dynamodb = admin("dynamodb", self.admin)
        iam = admin("iam", self.admin)
        for logical in by_type["AWS::DynamoDB::Table"]:
            self.create_table(dynamodb, logical, resources[logical]["Properties"])
        # function names are chosen up front: the scheduler's role names the webhook function
        for logical in by_type["AWS::Lambda::Function"]:
            name = f"{self.stack}-{logical}-{secrets.token_hex(6).upper()}"
            self.resolver.physical[logical] = name
            self.resolver.attributes[(logical, "Arn")] = \
                f"arn:aws:lambda:{self.region}:{cfn.ACCOUNT}:function:{name}"
        for logical in by_type.get("AWS::IAM::Role", []):
            self.create_role(iam, logical, resources[logical]["Properties"])
        api_logical = by_type["AWS::ApiGateway::RestApi"][0]
        self.api_id = secrets.token_hex(5)
        self.resolver.physical[api_logical] = self.api_id
        # the alarms first: the dashboard's alarm widget names their ARNs
        cloudwatch_client = admin("cloudwatch", self.admin)
        for logical in by_type["AWS::CloudWatch::Alarm"]:
            self.create_alarm(cloudwatch_client, logical, resources[logical]["Properties"])
        for logical in by_type["AWS::CloudWatch::Dashboard"]:
            self.create_dashboard(cloudwatch_client, logical, resources[logical]["Properties"])
        self.publish_outputs(create=True)
        return by_type

    def create_table(self, dynamodb, logical, properties):
        p = self.resolver.resolve(properties)
        name = f"{self.stack}-{logical}-{secrets.token_hex(6).upper()}"
        request = {"TableName": name, "AttributeDefinitions": p["AttributeDefinitions"],
                   "KeySchema": p["KeySchema"], "BillingMode": p.get("BillingMode", "PROVISIONED")}
        if "StreamSpecification" in p:
            request["StreamSpecification"] = {"StreamEnabled": True, **p["StreamSpecification"]}
        if p.get("SSESpecification", {}).get("SSEEnabled"):
            request["SSESpecification"] = {"Enabled": True}
        table = dynamodb.create_table(**request)["TableDescription"]
        if "TimeToLiveSpecification" in p:
            dynamodb.update_time_to_live(TableName=name,
                                         TimeToLiveSpecification=p["TimeToLiveSpecification"])
        if p.get("PointInTimeRecoverySpecification", {}).get("PointInTimeRecoveryEnabled"):
            dynamodb.update_continuous_backups(
                TableName=name,
                PointInTimeRecoverySpecification={"PointInTimeRecoveryEnabled": True})
        self.resolver.physical[logical] = name
        self.resolver.attributes[(logical, "Arn")] = table["TableArn"]
        if table.get("LatestStreamArn"):
            self.resolver.attributes[(logical, "StreamArn")] = table["LatestStreamArn"]
        # what was created is what the template says
        described = dynamodb.describe_table(TableName=name)["Table"]
        check(described["KeySchema"] == p["KeySchema"], f"{logical}: key schema differs")
        if "TimeToLiveSpecification" in p:
            ttl = dynamodb.describe_time_to_live(TableName=name)["TimeToLiveDescription"]
            check(ttl.get("TimeToLiveStatus") == "ENABLED"
                  and ttl.get("AttributeName") == p["TimeToLiveSpecification"]["AttributeName"],
                  f"{logical}: TTL is not on {p['TimeToLiveSpecification']['AttributeName']}")
        if "StreamSpecification" in p:
            check(described.get("StreamSpecification", {}).get("StreamViewType")
                  == p["StreamSpecification"]["StreamViewType"], f"{logical}: stream view differs")
        print(f"    table {logical} -> {name}", file=sys.stderr)

    def create_role(self, iam, logical, properties):
        p = self.resolver.resolve(properties)
        name = f"{self.stack}-{logical}-{secrets.token_hex(6).upper()}"[:64]
        role = iam.create_role(RoleName=name, Path=p.get("Path", "/"),
                               AssumeRolePolicyDocument=json.dumps(p["AssumeRolePolicyDocument"]))
        for arn in p.get("ManagedPolicyArns", []):
            iam.attach_role_policy(RoleName=name, PolicyArn=arn)
        for policy in p.get("Policies", []):
            # SAM writes some policies without a Version; IAM reads that as 2008-10-17 (no policy
            # variables, which none of them uses) while moto refuses it.
            document = {"Version": "2012-10-17", **policy["PolicyDocument"]}
            iam.put_role_policy(RoleName=name, PolicyName=policy["PolicyName"],
                                PolicyDocument=json.dumps(document))
        self.resolver.physical[logical] = name
        self.resolver.attributes[(logical, "Arn")] = role["Role"]["Arn"]
        print(f"    role {logical} -> {role['Role']['Arn']}", file=sys.stderr)

    @staticmethod
    def alarm_request(properties):
        """An AWS::CloudWatch::Alarm's resolved properties as a PutMetricAlarm request: the same
        names; numbers that came from a parameter (a string) made numbers again."""
        request = json.loads(json.dumps(properties))
        for key in ("Period", "EvaluationPeriods", "DatapointsToAlarm"):
            if key in request:
                request[key] = int(request[key])
        if "Threshold" in request:
            request["Threshold"] = float(request["Threshold"])
        for query in request.get("Metrics", []):
            if "Period" in query:
                query["Period"] = int(query["Period"])
            if "MetricStat" in query:
                query["MetricStat"]["Period"] = int(query["MetricStat"]["Period"])
        return request

    def create_alarm(self, cloudwatch_client, logical, properties):
        request = self.alarm_request(self.resolver.resolve(properties))
        request.setdefault("AlarmName", f"{self.stack}-{logical}-{secrets.token_hex(6).upper()}")
        cloudwatch_client.put_metric_alarm(**request)
        alarms = cloudwatch_client.describe_alarms(
            AlarmNames=[request["AlarmName"]])["MetricAlarms"]
        check(len(alarms) == 1, f"alarm {logical}: DescribeAlarms returned {alarms}")
        self.resolver.physical[logical] = request["AlarmName"]
        self.resolver.attributes[(logical, "Arn")] = alarms[0]["AlarmArn"]
        print(f"    alarm {logical} -> {request['AlarmName']}", file=sys.stderr)

    def create_dashboard(self, cloudwatch_client, logical, properties):
        p = self.resolver.resolve(properties)
        name = p.get("DashboardName") or f"{self.stack}-{logical}-{secrets.token_hex(6).upper()}"
        try:
            json.loads(p["DashboardBody"])
        except ValueError as error:
            raise RehearsalFailed(f"dashboard {logical}: the body is not JSON: {error}") from None
        answer = cloudwatch_client.put_dashboard(DashboardName=name,
                                                 DashboardBody=p["DashboardBody"])
        check(not answer.get("DashboardValidationMessages"),
              f"dashboard {logical}: {answer.get('DashboardValidationMessages')}")
        self.resolver.physical[logical] = name
        print(f"    dashboard {logical} -> {name}", file=sys.stderr)

    def start_functions(self, by_type):
        sts = self.client("sts", self.lambda_service)
        routes = []
        resources = self.expanded["Resources"]
        for logical in by_type["AWS::Lambda::Function"]:
            p = self.resolver.resolve(resources[logical]["Properties"])
            session = sts.assume_role(RoleArn=p["Role"], RoleSessionName=self.resolver.physical[logical],
                                      DurationSeconds=3600)["Credentials"]
            name = self.resolver.physical[logical]
            env = {
                "PATH": "/usr/local/bin:/usr/bin:/bin",
                "LANG": "en_US.UTF-8",
                "TZ": ":UTC",
                "_HANDLER": p["Handler"],
                "AWS_EXECUTION_ENV": f"AWS_Lambda_{p['Runtime']}",
                "AWS_LAMBDA_FUNCTION_NAME": name,
                "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(p.get("MemorySize", 128)),
                "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
                "AWS_LAMBDA_LOG_GROUP_NAME": f"/aws/lambda/{name}",
                "AWS_LAMBDA_LOG_STREAM_NAME": "rehearsal",
                "AWS_LAMBDA_LOG_FORMAT": p.get("LoggingConfig", {}).get("LogFormat", "Text"),
                "AWS_REGION": self.region,
                "AWS_DEFAULT_REGION": self.region,
                "AWS_ACCESS_KEY_ID": session["AccessKeyId"],
                "AWS_SECRET_ACCESS_KEY": session["SecretAccessKey"],
                "AWS_SESSION_TOKEN": session["SessionToken"],
                # the only addition: AWS's endpoints are moto here
                "AWS_ENDPOINT_URL": self.endpoint,
            }
            env.update({k: str(v) for k, v in p.get("Environment", {}).get("Variables", {}).items()})
            function = Function(name, os.path.join(self.bin, "bootstrap"), env,
                                int(p.get("Timeout", 3)), os.path.join(self.work, f"{logical}.log"))
            function.start()
            function.logical = logical
            function.credentials = session
            function.variables = p.get("Environment", {}).get("Variables", {})
            self.functions[logical] = function
        api_logical = by_type["AWS::ApiGateway::RestApi"][0]
        body = resources[api_logical]["Properties"]["Body"]
        for path, methods in body["paths"].items():
            for method, operation in methods.items():
                uri = self.resolver.resolve(operation["x-amazon-apigateway-integration"]["uri"])
                target = next(f for f in self.functions.values() if f"function:{f.name}/" in uri)
                routes.append((method, path, target))
        stages = [r["Properties"]["StageName"] for r in resources.values()
                  if r["Type"] == "AWS::ApiGateway::Stage"]
        check(len(stages) == 1, f"expected one API stage, found {stages}")
        self.api = RestApi(self.api_id, stages[0], self.region, routes)
        for method, path, target in routes:
            print(f"    {method.upper():5} /{stages[0]}{path} -> {target.logical}", file=sys.stderr)

    # ------------------------------------------------------------------ README's shell
    def readme_blocks(self, path, count, what):
        """README's code blocks marked `rehearsed: <path>`: `count` of them, README's `what`."""
        with open(os.path.join(self.root, "README.md")) as f:
            found = readme_shell.blocks(f.read(), path)
        check(len(found) == count, f"README has {len(found)} blocks marked 'rehearsed: {path}', "
              f"expected {count}: {what}")
        return found

    def run_readme(self, blocks, what):
        """Runs README's `blocks` as written in the operator's shell (a fresh one at the first
        call; later calls continue in it): the real `iam-broker`, `sam` and `kubectl` played by
        `shell_command`. Returns the transcript."""
        if self.shell is None:
            self.shell = readme_shell.Shell(
                os.path.join(self.work, "readme"), self.root, os.path.join(self.bin, "iam-broker"),
                self.shell_command,
                {  # what the operator's workstation has: credentials and a kubeconfig
                    "AWS_ACCESS_KEY_ID": self.admin["AccessKeyId"],
                    "AWS_SECRET_ACCESS_KEY": self.admin["SecretAccessKey"],
                    "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
                    "KUBECONFIG": self.admin_kubeconfig,
                    "AWS_ENDPOINT_URL": self.endpoint,  # the translation: AWS is moto
                    "RUST_LOG": "warn",
                },
                ["deploy", "template.yaml", "samconfig.toml"])
        status, transcript = self.shell.run(blocks)
        check(status == 0, f"README's {what} stopped (exit {status})")
        return transcript

    def shell_command(self, tool, argv, stdin, env, cwd):
        """A `sam` or `kubectl` command of README's script: (exit code, stdout, stderr)."""
        if tool == "sam" and argv[:1] == ["build"]:
            return 0, "", "(rehearsal: the SAM translator expands template.yaml at sam deploy)\n"
        if tool == "sam" and argv[:1] == ["deploy"]:
            return self.sam_deploy(argv[1:], env)
        if tool == "kubectl":
            namespace, rest = (argv[1], argv[2:]) if argv[:1] == ["-n"] and len(argv) > 1 \
                else (None, argv)
            if rest[:1] == ["apply"] and len(rest) > 1 and namespace is None:
                return self.kubectl_apply_command(rest[1:], stdin, cwd)
            if rest[:2] == ["annotate", "sa"] and len(rest) == 4 and namespace:
                return self.kubectl_annotate_sa(namespace, *rest[2:])
            if rest[:4] == ["get", "secrets", "-A", "-l"] and len(rest) == 5 and namespace is None:
                return self.kubectl_get_secrets(rest[4])
        return 2, "", f"rehearsal: `{tool} {' '.join(argv)}` is not modelled\n"

    def sam_deploy(self, argv, env):
        """`sam deploy` in sam's region: a new stack with its --parameter-overrides
        (samconfig.toml's are replaced by them, the other parameters at their defaults), or the
        stack deployed before again, every parameter not named keeping its value."""
        options, overrides, rest = {}, {}, list(argv)
        while rest:
            option = rest.pop(0)
            if option == "--parameter-overrides":
                while rest and not rest[0].startswith("--"):
                    name, _, value = rest.pop(0).partition("=")
                    # sam reads K="" as the empty string
                    overrides[name] = value[1:-1] if value[:1] == value[-1:] == '"' else value
            elif option in ("--stack-name", "--region") and rest:
                options[option] = rest.pop(0)
            else:
                return 2, "", f"rehearsal: sam deploy {option} is not modelled\n"
        # sam's boto3 reads AWS_DEFAULT_REGION, not AWS_REGION (which iam-broker reads)
        region = options.get("--region") or env.get("AWS_DEFAULT_REGION")
        check(region, "sam deploy has no region: it reads --region or AWS_DEFAULT_REGION")
        check(env.get("AWS_REGION") == region, f"sam deploys to {region}, iam-broker would look "
              f"in AWS_REGION={env.get('AWS_REGION')}")
        with open(os.path.join(self.root, "samconfig.toml"), "rb") as f:
            samconfig = tomllib.load(f)
        stack = options.get("--stack-name") or \
            samconfig["default"]["global"]["parameters"]["stack_name"]
        self.overrides = overrides
        if self.outputs:
            check((stack, region) == (self.stack, self.region),
                  f"sam deploy of {stack} in {region}: this path deployed {self.stack} in "
                  f"{self.region}")
            self.update_stack({**self.parameters, **overrides})
        else:
            self.region, self.stack = region, stack
            self.start_functions(self.deploy_stack(dict(overrides)))
        return 0, f"Successfully created/updated stack - {self.stack} in {region}\n", ""

    def kubectl_apply_command(self, argv, stdin, cwd):
        check(len(argv) % 2 == 0 and all(a == "-f" for a in argv[::2]),
              f"kubectl apply {' '.join(argv)}: the rehearsal models `apply -f FILE|-` only")
        applied = []
        for name in argv[1::2]:
            if name == "-":
                applied += self.kubectl_apply(documents=list(yaml.safe_load_all(stdin)))
            else:
                self.applied_files.append(os.path.relpath(os.path.realpath(os.path.join(cwd, name)),
                                                          self.root))
                applied += self.kubectl_apply(os.path.join(cwd, name))
        return 0, "".join(f"{a} applied\n" for a in applied), ""

    def kubectl_annotate_sa(self, namespace, name, annotation):
        """`kubectl -n NS annotate sa NAME KEY=VALUE` (no --overwrite). The stand-in updates no
        object in place: the ServiceAccount is replaced by itself with the annotation, its uid
        and creation time kept."""
        key, equals, value = annotation.partition("=")
        check(key and equals, f"kubectl annotate {annotation}: the rehearsal models KEY=VALUE only")
        path = f"/api/v1/namespaces/{namespace}/serviceaccounts"
        status, account = self.kube("GET", f"{path}/{name}")
        if status == 404:
            return 1, "", f'Error from server (NotFound): serviceaccounts "{name}" not found\n'
        check(status == 200, f"reading ServiceAccount {namespace}/{name}: {status} {account}")
        annotations = account["metadata"].get("annotations") or {}
        if annotations.get(key, value) != value:
            return 1, "", (f"error: --overwrite is false but found the following declared "
                           f"annotation(s): '{key}' already has a value ({annotations[key]})\n")
        account["metadata"]["annotations"] = {**annotations, key: value}
        for method, at, body in (("DELETE", f"{path}/{name}", None), ("POST", path, account)):
            status, answer = self.kube(method, at, body)
            check(status in (200, 201), f"annotating ServiceAccount {namespace}/{name}: {method} "
                  f"{status} {answer}")
        return 0, f"serviceaccount/{name} annotated\n", ""

    def labelled_secrets(self, selector):
        """The Secrets of every namespace carrying labels `selector`, as namespace/name."""
        status, listed = self.kube(
            "GET", f"/api/v1/secrets?labelSelector={urllib.parse.quote(selector)}")
        check(status == 200, f"listing the Secrets labelled {selector}: {status} {listed}")
        return [f"{s['metadata']['namespace']}/{s['metadata']['name']}" for s in listed["items"]]

    def kubectl_get_secrets(self, selector):
        """`kubectl get secrets -A -l SELECTOR`: kubectl's table, or its "No resources found"."""
        self.listed_secrets = self.labelled_secrets(selector)
        if not self.listed_secrets:
            return 0, "", "No resources found\n"
        return 0, "NAMESPACE   NAME\n" + "".join(
            "   ".join(s.split("/", 1)) + "\n" for s in self.listed_secrets), ""

    # ------------------------------------------------------------------ the operator's steps
    def cli(self, *argv, stdin=None, extra_env=None, expect_ok=True):
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": self.work,
            "AWS_REGION": self.region,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.admin["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": self.admin["SecretAccessKey"],
            "AWS_CONFIG_FILE": "/dev/null",
            "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
            "KUBECONFIG": self.admin_kubeconfig,
            "IAM_BROKER_STACK": self.stack,
            "RUST_LOG": "warn",
        }
        env.update(extra_env or {})
        result = subprocess.run([os.path.join(self.bin, "iam-broker"), *argv], env=env,
                                input=stdin, capture_output=True, text=True, timeout=60)
        if expect_ok:
            check(result.returncode == 0,
                  f"iam-broker {' '.join(argv)} exited {result.returncode}:\n{result.stdout}{result.stderr}")
        return result

    def admission(self, operation, pod, old=None):
        """What the API server does for one Pod CREATE / DELETE: pick the matching webhooks of
        the registered configuration, call each, apply the patches."""
        review_uid = secrets.token_hex(8)
        self.warnings = []
        namespace = (pod or old)["metadata"]["namespace"]
        for hook in self.registration["webhooks"]:
            if not self.hook_matches(hook, operation, namespace, pod if operation == "CREATE" else old):
                continue
            url = self.api.local_url(hook["clientConfig"]["url"])
            review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
                "uid": review_uid, "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
                "requestResource": {"group": "", "version": "v1", "resource": "pods"},
                "name": (pod or old)["metadata"].get("name", ""), "namespace": namespace,
                "operation": operation,
                "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
                "object": pod if operation == "CREATE" else None,
                "oldObject": old if operation == "DELETE" else None,
                "dryRun": False, "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}}}
            status, _, body = http_request("POST", url, json.dumps(review).encode(),
                                           {"Content-Type": "application/json"})
            check(status == 200, f"webhook {hook['name']} answered {status}: {body[:300]!r}")
            response = json.loads(body)["response"]
            check(response["uid"] == review_uid and response["allowed"],
                  f"webhook {hook['name']}: {response}")
            # what kubectl prints as "Warning: ..."
            self.warnings += response.get("warnings") or []
            if response.get("patch"):
                check(operation == "CREATE", "a DELETE answer carries a patch")
                patch = json.loads(base64.b64decode(response["patch"]))
                pod = jsonpatch.apply_patch(pod, patch)
            yield hook["name"]
        self.admitted = pod

    def hook_matches(self, hook, operation, namespace, obj):
        if not any(operation in rule["operations"] and "pods" in rule["resources"]
                   for rule in hook["rules"]):
            return False
        labels = {"kubernetes.io/metadata.name": namespace, **self.namespace_labels.get(namespace, {})}
        if not selector_matches(hook.get("namespaceSelector", {}), labels):
            return False
        return selector_matches(hook.get("objectSelector", {}),
                                (obj or {}).get("metadata", {}).get("labels", {}) or {})

    def create_pod(self, name, service_account, owner=None, annotations=None):
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "namespace": NAMESPACE, "labels": {"app": name},
                            **({"annotations": dict(annotations)} if annotations else {}),
                            **({"ownerReferences": [owner]} if owner else {})},
               "spec": {"serviceAccountName": service_account, "containers": [
                   {"name": "app", "image": "public.ecr.aws/aws-cli/aws-cli:latest",
                    "args": ["sts", "get-caller-identity"]}]}}
        called = list(self.admission("CREATE", pod))
        status, stored = self.kube("POST", f"/api/v1/namespaces/{NAMESPACE}/pods", self.admitted)
        check(status == 201, f"pod {name}: {status} {stored}")
        return stored, called

    def delete_pod(self, pod):
        called = list(self.admission("DELETE", None, old=pod))
        status, _ = self.kube("DELETE", f"/api/v1/namespaces/{NAMESPACE}/pods/{pod['metadata']['name']}")
        check(status == 200, f"deleting pod {pod['metadata']['name']}: {status}")
        return called

    def token_request(self, pod, audience):
        """The kubelet's TokenRequest for `pod`'s projected volume: a token of its ServiceAccount
        for `audience`, bound to the pod (its name and uid)."""
        account = pod["spec"].get("serviceAccountName") or "default"
        status, answer = self.kube(
            "POST", f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts/{account}/token", {
                "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                "spec": {"audiences": [audience], "expirationSeconds": 3600,
                         "boundObjectRef": {"apiVersion": "v1", "kind": "Pod",
                                            "name": pod["metadata"]["name"],
                                            "uid": pod["metadata"]["uid"]}}})
        check(status == 201, f"the kubelet's TokenRequest for {pod['metadata']['name']}: "
              f"{status} {answer}")
        return answer["status"]["token"]

    def container_env(self, container):
        env = {}
        for item in container.get("env", []):
            if "value" in item:
                env[item["name"]] = item["value"]
            elif "secretKeyRef" in item.get("valueFrom", {}):
                ref = item["valueFrom"]["secretKeyRef"]
                status, secret = self.kube(
                    "GET", f"/api/v1/namespaces/{NAMESPACE}/secrets/{ref['name']}")
                check(status == 200, f"the kubelet cannot read Secret {ref['name']}: {status}")
                env[item["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
        return env

    def run_pod(self, pod, token_file=None):
        """The kubelet's part: the sidecar and the app container, with the env the patch gave
        them (`token_file`: where the kubelet wrote the pod's projected token). Returns (app exit
        code, stdout, stderr)."""
        containers = pod["spec"].get("initContainers", []) + pod["spec"]["containers"]
        sidecar = next(c for c in containers if c["name"] == "iam-broker-proxy")
        app = next(c for c in pod["spec"]["containers"] if c["name"] == "app")
        sidecar_env = self.container_env(sidecar)
        app_env = self.container_env(app)
        # projected: BrokerUrl?role=<the pod's role>
        check(sidecar_env.get("BROKER_URL", "").split("?")[0] == self.outputs["BrokerUrl"],
              f"the sidecar calls {sidecar_env.get('BROKER_URL')}, the stack's BrokerUrl is "
              f"{self.outputs['BrokerUrl']}")
        if token_file:
            check(app_env.get("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"),
                  f"the app has no AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE: {sorted(app_env)}")
            app_env["AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"] = token_file
        pod_port = free_port()
        listen = sidecar_env.get("LISTEN_ADDR", "127.0.0.1:53080")
        sidecar_env["BROKER_URL"] = self.api.local_url(sidecar_env["BROKER_URL"])
        sidecar_env["LISTEN_ADDR"] = f"127.0.0.1:{pod_port}"
        proxy = self.spawn([os.path.join(self.bin, "iam-broker-proxy")],
                           f"sidecar-{pod['metadata']['name']}.log", sidecar_env)
        try:
            wait_for(lambda: http_request("GET", f"http://127.0.0.1:{pod_port}/healthz")[0] == 200,
                     "the sidecar")
            uri = app_env["AWS_CONTAINER_CREDENTIALS_FULL_URI"]
            check(uri.startswith(f"http://{listen.split(':')[0]}:{listen.split(':')[1]}"),
                  f"the app is pointed at {uri}, the sidecar listens on {listen}")
            app_env["AWS_CONTAINER_CREDENTIALS_FULL_URI"] = uri.replace(
                f":{listen.split(':')[1]}", f":{pod_port}", 1)
            app_env.update({
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
                "AWS_ENDPOINT_URL": self.endpoint,
                "AWS_DEFAULT_REGION": app_env.get("AWS_DEFAULT_REGION", self.region),
            })
            result = subprocess.run([self.args.aws, *app["args"], "--output", "json"],
                                    env=app_env, capture_output=True, text=True, timeout=60)
            return result
        finally:
            proxy.terminate()

    # ------------------------------------------------------------------ direct injection
    def sdk_trust(self):
        """The private CA of the API Gateway emulator's TLS listener, trusted as a pod image
        would trust a broker's CA: the env each SDK reads it from. The AWS SDK for Rust takes the
        platform's roots (`SSL_CERT_FILE`), Node.js adds `NODE_EXTRA_CA_CERTS`; botocore's
        container fetcher verifies against certifi's bundle and reads no variable (not
        AWS_CA_BUNDLE), so the CA is appended to a copy of the CLI's certifi put first on
        PYTHONPATH (in an image: `cat ca.pem >> "$(python -m certifi)"`)."""
        if getattr(self, "_sdk_trust", None) is None:
            folder = os.path.join(self.work, "pod-trust")
            os.makedirs(folder)
            ca = os.path.join(folder, "ca.pem")
            with open(ca, "w") as f:
                f.write(self.api.tls_ca_pem)
            # the AWS CLI's own Python (its script's interpreter) is whose certifi counts
            with open(shutil.which(self.args.aws) or self.args.aws, "rb") as f:
                shebang = f.readline()
            python = shebang[2:].decode().split() if shebang.startswith(b"#!") else [sys.executable]
            located = subprocess.run(
                [*python, "-c", "import certifi, os; print(os.path.dirname(certifi.__file__))"],
                capture_output=True, text=True, timeout=30)
            check(located.returncode == 0, f"the AWS CLI's Python has no certifi: {located.stderr}")
            certifi = os.path.join(folder, "python", "certifi")
            shutil.copytree(located.stdout.strip(), certifi,
                            ignore=shutil.ignore_patterns("__pycache__"))
            with open(os.path.join(certifi, "cacert.pem"), "a") as f:
                f.write("\n" + self.api.tls_ca_pem)
            self._sdk_trust = {"SSL_CERT_FILE": ca, "NODE_EXTRA_CA_CERTS": ca,
                               "PYTHONPATH": os.path.join(folder, "python")}
        return dict(self._sdk_trust)

    def direct_env(self, app_env, uri, trust=True):
        """The kubelet's env for a direct pod's app container: what the patch gave it, its
        FULL_URI (the stack's https URL) translated to the TLS listener, and nothing of this
        machine's environment but PATH (no keys, no profile, no CA settings)."""
        env = dict(app_env)
        home = os.path.join(self.work, "pod-home")
        os.makedirs(home, exist_ok=True)
        env.update({
            "AWS_CONTAINER_CREDENTIALS_FULL_URI": self.api.local_tls_url(uri),
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": home,
            "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_ENDPOINT_URL": self.endpoint,
        })
        env.setdefault("AWS_REGION", env.get("AWS_DEFAULT_REGION", self.region))
        env.setdefault("AWS_DEFAULT_REGION", env["AWS_REGION"])
        if trust:
            env.update(self.sdk_trust())
        return env

    def sdk_programs(self):
        """(name, argv) of the three SDK consumers: each prints its caller identity as JSON."""
        script = os.path.join(self.root, "tests", "js", "whoami.mjs")
        node_modules = os.path.join(self.root, "tests", "js", "node_modules")
        check(os.path.isdir(os.path.join(node_modules, "@aws-sdk", "credential-providers")),
              f"{node_modules} lacks the AWS SDK for JavaScript: npm ci --prefix tests/js "
              "(scripts/rehearse-deploy.sh runs it)")
        node = shutil.which("node")
        check(node is not None, "node is not on PATH (scripts/rehearse-deploy.sh installs it)")
        whoami = os.path.join(self.bin, "sdk-whoami")
        check(os.path.isfile(whoami), f"{whoami} is missing: cargo build -p iam-broker-tests --bins")
        return [("AWS CLI", [self.args.aws, "sts", "get-caller-identity", "--output", "json"]),
                ("AWS SDK for Rust", [whoami]),
                ("AWS SDK for JavaScript v3", [node, script])]

    def three_sdks(self, env):
        """Runs each SDK consumer once, a process each, with `env`: their caller ARNs."""
        arns = []
        for sdk, argv in self.sdk_programs():
            result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
            check(result.returncode == 0,
                  f"{sdk} got no credentials (exit {result.returncode}):\n{result.stderr[-2000:]}")
            arn = json.loads(result.stdout)["Arn"]
            check(ASSUMED_ROLE in arn, f"{sdk} is {arn}, not a session of {ALLOWED_ROLE_NAME}")
            print(f"    {sdk}: {arn}", file=sys.stderr)
            arns.append(arn)
        return arns

    def served(self, pod_name):
        """The BrokerFunction's `credentials served` lines for pod `pod_name`: their `cache`."""
        lines = []
        with open(os.path.join(self.work, "BrokerFunction.log"), errors="replace") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if entry.get("message") == "credentials served" and entry.get("pod") == pod_name:
                    lines.append(entry.get("cache"))
        return lines

    def direct_pod(self):
        step("a direct pod (iam-broker.io/injection: direct): no sidecar; the AWS CLI, the Rust "
             "and the JavaScript SDK at the stack's https URL")
        name = "direct-reader"
        pod, hooks = self.create_pod(name, "app-sa", annotations=DIRECT)
        check(hooks, "no webhook of the registration matched the direct pod's CREATE")
        containers = pod["spec"]["containers"] + pod["spec"].get("initContainers", [])
        check(not any(c["name"] == "iam-broker-proxy" for c in containers),
              f"the direct pod got a sidecar: {[c['name'] for c in containers]}")
        check(pod["metadata"].get("labels", {}).get("iam-broker.io/injected") == "true",
              f"the direct pod is not labelled injected: {pod['metadata'].get('labels')}")
        app = next(c for c in pod["spec"]["containers"] if c["name"] == "app")
        declared = {e["name"]: e for e in app.get("env", [])}
        uri = declared.get("AWS_CONTAINER_CREDENTIALS_FULL_URI", {}).get("value")
        check(uri == self.outputs["BrokerUrl"],
              f"the direct pod is pointed at {uri}, the stack's BrokerUrl is "
              f"{self.outputs['BrokerUrl']}")
        reference = declared.get("AWS_CONTAINER_AUTHORIZATION_TOKEN", {}).get(
            "valueFrom", {}).get("secretKeyRef", {})
        secret_name = pod["metadata"].get("annotations", {}).get("iam-broker.io/secret-name")
        check(reference.get("name") and reference["name"] == secret_name,
              f"the direct pod's token is not from its Secret {secret_name}: "
              f"{declared.get('AWS_CONTAINER_AUTHORIZATION_TOKEN')}")
        print(f"    containers {[c['name'] for c in containers]}, FULL_URI = BrokerUrl, token from "
              f"Secret {secret_name}", file=sys.stderr)
        app_env = self.container_env(app)
        env = self.direct_env(app_env, uri)
        self.three_sdks(env)
        caches = self.served(name)
        check(len(caches) >= 3 and caches[0] == "miss" and set(caches[1:]) == {"hit"},
              f"expected the direct pod's first fetch to miss the broker's cache and the others "
              f"to hit it, got {caches}")
        print(f"    BrokerFunction cache: {', '.join(caches)} ({len(caches)} fetches, one "
              "AssumeRole)", file=sys.stderr)
        # The AWS CLI with certifi's own bundle (the one SDK of the three that fails at once:
        # the Rust and the JavaScript SDK retry for seconds before giving up)
        refused = subprocess.run([self.args.aws, "sts", "get-caller-identity", "--output", "json"],
                                 env=self.direct_env(app_env, uri, trust=False),
                                 capture_output=True, text=True, timeout=60)
        check(refused.returncode != 0,
              f"the AWS CLI got credentials without trusting the CA: {refused.stdout}")
        check("certificate verify failed" in refused.stderr,
              f"the AWS CLI without the CA failed, but not at the handshake: {refused.stderr}")
        check(self.served(name) == caches, "a fetch without the CA reached the broker")
        print("    without the CA, the AWS CLI is refused at the handshake: certificate verify "
              "failed, nothing served", file=sys.stderr)

    # ------------------------------------------------------------------ the rehearsal
    def run(self):
        step("SAM expansion of template.yaml, moto with IAM enforcement; the cluster")
        self.start_moto()
        self.bootstrap_identities()
        self.start_cluster()
        # the application's ServiceAccount, which README's `kubectl annotate sa` finds in place
        status, answer = self.kube("POST", f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts",
                                   {"metadata": {"name": "app-sa", "namespace": NAMESPACE}})
        check(status == 201, f"creating ServiceAccount app-sa: {status} {answer}")

        step("README Secret mode as written, in the operator's shell: sam deploy, kubectl apply "
             "deploy/, kubeconfig --store, doctor, allow, annotate, render-webhook")
        (block,) = self.readme_blocks("secret", 1, "Secret mode's")
        # the webhook is registered last: the first pod finds its kubeconfig, allowance and role
        order = ("sam deploy", "kubectl apply", "--store", "iam-broker doctor", "iam-broker allow",
                 "annotate sa", "render-webhook")
        check(in_order(block, order), f"README's Secret mode block is not in the order {order}")
        transcript = self.run_readme([block], "Secret mode block")

        step("what README's sam deploy created: a secret-mode stack")
        parameters = self.parameters
        check(parameters.get("KubeconfigParameterName"),
              f"README's sam deploy passes {sorted(parameters)}: no KubeconfigParameterName")
        without = {k: v for k, v in parameters.items() if k != "KubeconfigParameterName"}
        refusals = cfn.rule_refusals(self.expanded_template(without), without)
        check(any("KubeconfigParameterName is required when IdentityMode is secret" in r
                  for r in refusals),
              f"a secret-mode stack without KubeconfigParameterName is not refused: {refusals}")
        print(f"    refused without KubeconfigParameterName: {refusals[0]}", file=sys.stderr)
        for key, value in sorted(self.outputs.items()):
            print(f"    output {key} = {value}", file=sys.stderr)
        for name in ("BrokerUrl", "WebhookUrlWithoutSecret", "AllowancesTableName",
                     "AuthorizationsTableName", "ClustersTableName", "BrokerFunctionRoleArn",
                     "KubeconfigParameterName", "IdentityMode", "DashboardName", "DashboardUrl",
                     "AlarmNames"):
            check(name in self.outputs, f"the stack has no output {name}")
        check(self.outputs["IdentityMode"] == "secret",
              f"the IdentityMode output is {self.outputs['IdentityMode']}")
        check("CleanupFunction" in self.functions,
              f"the stack runs {sorted(self.functions)}: no CleanupFunction with a kubeconfig")
        step("the dashboard and the alarms read the metrics the functions write")
        self.check_dashboard_and_alarms()

        step("what README's kubectl apply, kubeconfig --store, doctor and render-webhook did")
        applied = sorted(set(self.applied_files))
        check(applied == sorted(MANIFESTS[m] for m in ("namespace", "webhook identity",
                                                       "secret RBAC")),
              f"README applied {applied}: secret mode needs the webhook's identity and RBAC")
        ssm = self.client("ssm", self.admin)
        parameter = ssm.get_parameter(Name=self.outputs["KubeconfigParameterName"],
                                      WithDecryption=True)["Parameter"]
        check(parameter["Type"] == "SecureString", "the kubeconfig parameter is not a SecureString")
        for line in (f"kubeconfig parameter: {self.outputs['KubeconfigParameterName']} decrypts",
                     "Kubernetes RBAC get serviceaccounts: allowed",
                     "Kubernetes RBAC create secrets: allowed",
                     "Kubernetes RBAC delete secrets: allowed",
                     f"sidecar image: {self.outputs['ProxyImage']}"):
            check(doctor_said_ok(transcript, line), f"iam-broker doctor did not say `ok {line}`")
        missing = self.cli("render-webhook", expect_ok=False)
        check(missing.returncode != 0 and "WEBHOOK_PATH_SECRET" in missing.stderr,
              f"render-webhook without the path secret did not refuse: {missing.stderr}")
        short = self.cli("render-webhook", "--url", self.outputs["WebhookUrlWithoutSecret"],
                         expect_ok=False)
        check(short.returncode != 0, "render-webhook accepted a /mutate/ URL without a secret")
        hooks = self.registration["webhooks"] if self.registration else []
        urls = {h["clientConfig"]["url"] for h in hooks}
        check(urls == {self.outputs["WebhookUrlWithoutSecret"] + self.path_secret},
              f"the registration points at {urls}")
        check(sorted(o for h in hooks for r in h["rules"] for o in r["operations"])
              == ["CREATE", "DELETE"], f"the secret-mode registration: {json.dumps(hooks)[:400]}")
        print(f"    kubectl applied {', '.join(applied)}; the kubeconfig a SecureString; "
              f"registration {self.registration['metadata']['name']}: Pod CREATE and DELETE",
              file=sys.stderr)

        step("README Use: the role README allowed, trusting the broker; the ServiceAccount "
             "annotated; and a role outside AllowedRoleArnPattern")
        iam = self.client("iam", self.admin)
        trust = {"Version": "2012-10-17", "Statement": [{
            "Effect": "Allow", "Principal": {"AWS": self.outputs["BrokerFunctionRoleArn"]},
            "Action": ["sts:AssumeRole", "sts:TagSession"]}]}
        allowed_role = iam.create_role(RoleName=ALLOWED_ROLE_NAME, Path="/iam-broker/",
                                       AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]
        outside_role = iam.create_role(RoleName=OUTSIDE_ROLE_NAME, Path="/",
                                       AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]
        listed = json.loads(self.cli("allowances", "--output", "json").stdout)
        check([(r["service_account"], r["allowed_roles"]) for r in listed]
              == [("app-sa", [allowed_role])], f"README's allow left {listed}")
        annotation = self.functions["WebhookFunction"].variables.get(
            "ROLE_ARN_ANNOTATION", "eks.amazonaws.com/role-arn")
        status, account = self.kube("GET", f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts/app-sa")
        annotations = account.get("metadata", {}).get("annotations")
        check(status == 200 and annotations == {annotation: allowed_role},
              f"README's kubectl annotate left app-sa with {annotations}; the webhook reads "
              f"{annotation}")
        self.cli("allow", "--namespace", NAMESPACE, "--service-account", "legacy-sa",
                 "--role", outside_role)
        status, answer = self.kube("POST", f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts", {
            "metadata": {"name": "legacy-sa", "namespace": NAMESPACE,
                         "annotations": {annotation: outside_role}}})
        check(status == 201, f"annotating legacy-sa: {status} {answer}")
        listed = json.loads(self.cli("allowances", "--output", "json").stdout)
        check(len(listed) == 2, f"allowances lists {listed}")
        print(f"    {allowed_role} trusts the broker; app-sa: {annotation}: {allowed_role}",
              file=sys.stderr)

        step("the first pod: admission through API Gateway, then the sidecar and `aws sts get-caller-identity`")
        pod, hooks = self.create_pod("s3-listing", "app-sa")
        check(hooks, "no webhook of the registration matched a Pod CREATE in app1")
        check(any(c["name"] == "iam-broker-proxy"
                  for c in pod["spec"]["containers"] + pod["spec"].get("initContainers", [])),
              f"the pod was not injected: {json.dumps(pod)[:400]}")
        result = self.run_pod(pod)
        check(result.returncode == 0, f"aws sts get-caller-identity failed:\n{result.stderr}")
        identity = json.loads(result.stdout)
        check(ASSUMED_ROLE in identity["Arn"], f"wrong identity {identity}")
        print(f"    the pod is {identity['Arn']}", file=sys.stderr)

        self.direct_pod()

        step("a Deployment whose role is not allowed: no credentials, and an Event says why")
        status, _ = self.kube("POST", f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts", {
            "metadata": {"name": "unlisted-sa", "namespace": NAMESPACE,
                         "annotations": {annotation: allowed_role}}})
        check(status == 201, f"creating unlisted-sa: {status}")
        owner = {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "reports-5d8f7",
                 "uid": "0f0e0d0c-0000-4000-8000-000000000001", "controller": True}
        for replica in ("reports-5d8f7-a", "reports-5d8f7-b"):
            unlisted, _ = self.create_pod(replica, "unlisted-sa", owner)
            check(not any(c["name"] == "iam-broker-proxy" for c in unlisted["spec"]["containers"]),
                  "a pod whose role is not allowed was injected")
        status, events = self.kube("GET", f"/api/v1/namespaces/{NAMESPACE}/events")
        check(status == 200, f"listing events: {status}")
        told = [e for e in events["items"] if e.get("reason") == "RoleNotAllowed"]
        check(len(told) == 1, f"expected one RoleNotAllowed Event for two pods, got {told}")
        involved = told[0]["involvedObject"]
        check((involved["kind"], involved["name"], involved.get("uid")) ==
              ("ReplicaSet", owner["name"], owner["uid"]) and told[0]["type"] == "Warning",
              f"the Event is about {involved}")
        print(f"    kubectl describe rs {owner['name']}: Warning RoleNotAllowed "
              f"{told[0]['message']}", file=sys.stderr)

        step("README Validate: token create, curl-equivalent, credentials, revoke by prefix")
        created = self.cli("token", "create", "--namespace", NAMESPACE, "--service-account",
                           "app-sa", "--role", allowed_role, "--pod", "validate")
        token = created.stdout.strip()
        broker = self.api.local_url(self.outputs["BrokerUrl"])
        status, headers, body = http_request("GET", broker, headers={"Authorization": token})
        check(status == 200 and "max-age=" in headers.get("cache-control", ""),
              f"the broker answered {status} {body[:200]!r}")
        summary = self.cli("credentials", "--url", broker, extra_env={"IAM_BROKER_TOKEN": token})
        check(allowed_role in summary.stdout, f"credentials printed {summary.stdout}")
        check(token not in summary.stdout + summary.stderr, "a command printed the token")
        prefix = created.stderr.split("recorded token ", 1)[1].split()[0]
        self.cli("token", "revoke", "--hash", prefix)
        status, _, body = http_request("GET", broker, headers={"Authorization": token})
        check(status == 403 and b"InvalidToken" in body, f"a revoked token answered {status} {body!r}")

        self.projected_identity(allowed_role, broker)

        step("a role outside AllowedRoleArnPattern: 502 AssumeRoleFailed")
        legacy, _ = self.create_pod("legacy", "legacy-sa")
        legacy_token = self.container_env(next(
            c for c in legacy["spec"]["containers"] if c["name"] == "app"))[
            "AWS_CONTAINER_AUTHORIZATION_TOKEN"]
        status, _, body = http_request("GET", broker, headers={"Authorization": legacy_token})
        check(status == 502 and json.loads(body)["Code"] == "AssumeRoleFailed",
              f"a role outside the pattern answered {status} {body!r}")

        step("least privilege: what each function's role must not do")
        broker_fn = self.functions["BrokerFunction"].credentials
        webhook_fn = self.functions["WebhookFunction"].credentials
        cleanup_fn = self.functions["CleanupFunction"].credentials
        allowances = self.outputs["AllowancesTableName"]
        clusters = self.outputs["ClustersTableName"]
        scanned = self.client("dynamodb", broker_fn).scan(TableName=clusters)
        check([i["cluster"]["S"] for i in scanned["Items"]] == [self.cluster],
              f"the broker's role scanned {scanned['Items']}")
        print("    allowed as it should be: broker scans the Clusters table", file=sys.stderr)
        checks = {
            "broker cannot read the kubeconfig parameter": lambda: self.client("ssm", broker_fn)
            .get_parameter(Name=self.outputs["KubeconfigParameterName"], WithDecryption=True),
            "broker cannot write Allowances": lambda: self.client("dynamodb", broker_fn).put_item(
                TableName=allowances, Item={"namespace": {"S": "x"}, "service_account": {"S": "y"},
                                            "allowed_roles": {"SS": [allowed_role]}}),
            "broker cannot delete token records": lambda: self.client("dynamodb", broker_fn)
            .delete_item(TableName=self.outputs["AuthorizationsTableName"],
                         Key={"token_hash": {"S": "0" * 64}}),
            "webhook cannot call sts:AssumeRole": lambda: self.client("sts", webhook_fn)
            .assume_role(RoleArn=allowed_role, RoleSessionName="escalate"),
            "webhook cannot write Allowances": lambda: self.client("dynamodb", webhook_fn).put_item(
                TableName=allowances, Item={"namespace": {"S": "x"}, "service_account": {"S": "y"},
                                            "allowed_roles": {"SS": [allowed_role]}}),
            "webhook cannot scan token records": lambda: self.client("dynamodb", webhook_fn)
            .scan(TableName=self.outputs["AuthorizationsTableName"]),
            "webhook cannot delete token records": lambda: self.client("dynamodb", webhook_fn)
            .delete_item(TableName=self.outputs["AuthorizationsTableName"],
                         Key={"token_hash": {"S": "0" * 64}}),
            "cleanup cannot call sts:AssumeRole": lambda: self.client("sts", cleanup_fn)
            .assume_role(RoleArn=allowed_role, RoleSessionName="escalate"),
            "cleanup cannot read Allowances": lambda: self.client("dynamodb", cleanup_fn).get_item(
                TableName=allowances, Key={"namespace": {"S": "x"}, "service_account": {"S": "y"}}),
            "broker cannot write the Clusters table": lambda: self.client("dynamodb", broker_fn)
            .put_item(TableName=clusters, Item={"cluster": {"S": "forged"},
                                                "issuer": {"S": "https://forged"},
                                                "jwks": {"S": "{}"}}),
            "broker cannot delete from the Clusters table": lambda: self.client("dynamodb", broker_fn)
            .delete_item(TableName=clusters, Key={"cluster": {"S": self.cluster}}),
            "webhook cannot read the Clusters table": lambda: self.client("dynamodb", webhook_fn)
            .scan(TableName=clusters),
            "cleanup cannot read the Clusters table": lambda: self.client("dynamodb", cleanup_fn)
            .scan(TableName=clusters),
        }
        for what, call in checks.items():
            check(denied(call), f"expected AccessDenied: {what}")
            print(f"    denied as it should be: {what}", file=sys.stderr)

        step("pod DELETE (webhook), the Authorizations stream and the scheduled sweep (cleanup)")
        secret_name = pod["metadata"]["annotations"]["iam-broker.io/secret-name"]
        hooks = self.delete_pod(pod)
        check(hooks, "no webhook of the registration matched the injected pod's DELETE")
        status, _ = self.kube("GET", f"/api/v1/namespaces/{NAMESPACE}/secrets/{secret_name}")
        check(status == 404, f"the pod's Secret survived its DELETE ({status})")
        token_hash = pod["metadata"]["annotations"]["iam-broker.io/token-hash"]
        item = self.client("dynamodb", self.admin).get_item(
            TableName=self.outputs["AuthorizationsTableName"],
            Key={"token_hash": {"S": token_hash}}).get("Item", {})
        check("retracted_at" in item,
              f"the pod's token record was not retracted by its DELETE: {sorted(item)}")
        plain = {"apiVersion": "v1", "kind": "Pod",
                 "metadata": {"name": "plain", "namespace": NAMESPACE, "labels": {"app": "plain"}},
                 "spec": {"containers": [{"name": "app", "image": "busybox"}]}}
        check(not [h for h in self.registration["webhooks"]
                   if self.hook_matches(h, "DELETE", NAMESPACE, plain)],
              "a pod that never had credentials would still cost a DELETE call")
        # each event goes to the function the template wires it to
        schedule = next(r for r in self.expanded["Resources"].values()
                        if r["Type"] == "AWS::Scheduler::Schedule")
        sweeper = self.function_with_arn(self.resolver.resolve(schedule["Properties"]["Target"]["Arn"]))
        sweep = sweeper.invoke(json.loads(schedule["Properties"]["Target"]["Input"]))
        print(f"    {sweeper.logical} swept: {json.dumps(sweep)}", file=sys.stderr)
        with open(os.path.join(self.root, "events", "dynamodb-stream-remove.json")) as f:
            stream_event = json.load(f)
        mapping = next(r for r in self.expanded["Resources"].values()
                       if r["Type"] == "AWS::Lambda::EventSourceMapping")
        stream_arn = self.resolver.resolve(mapping["Properties"]["EventSourceArn"])
        check(stream_arn == self.resolver.attributes[("Authorizations", "StreamArn")],
              f"the stream mapping reads {stream_arn}, not the Authorizations stream")
        consumer = self.function_named(self.resolver.resolve(mapping["Properties"]["FunctionName"]))
        for record in stream_event["Records"]:
            record["eventSourceARN"] = stream_arn
        cleaned = consumer.invoke(stream_event)
        print(f"    {consumer.logical} cleaned the stream batch: {json.dumps(cleaned)}",
              file=sys.stderr)

        self.move_to_projected(allowed_role)

        step("every call the functions made was allowed")
        for function in self.functions.values():
            with open(os.path.join(self.work, f"{function.logical}.log"), errors="replace") as f:
                lines = f.read().splitlines()
            # an EMF line may carry STS's code (StsErrors, AwsCode AccessDenied): a metric,
            # not a call that was denied
            denials = [line for line in lines
                       if "AccessDenied" in line and cloudwatch.emf_record(line) is None]
            # the one refusal the rehearsal asked for: the role outside AllowedRoleArnPattern
            expected = [line for line in denials if '"code":"AssumeRoleFailed"' in line]
            if function.logical == "BrokerFunction":
                check(len(expected) == 1, f"expected one AssumeRoleFailed, got {expected}")
                denials = [line for line in denials if line not in expected]
            check(not denials, f"{function.logical} was denied:\n" + "\n".join(denials[:5]))
            # a refused call may also surface as a warning (a best-effort write, a failed-open
            # admission): none is expected on this path
            troubles = [line for line in lines
                        if '"level":"WARN"' in line or '"level":"ERROR"' in line]
            check(not troubles, f"{function.logical} logged trouble:\n" + "\n".join(troubles[:5]))
            check(not any("panicked" in line for line in lines), f"{function.logical} panicked")
            print(f"    {function.logical}: {len(lines)} log lines, no AccessDenied, no warning",
                  file=sys.stderr)
        step("the metrics the functions wrote (EMF on stdout): the ones the dashboard and the "
             "alarms read")
        self.check_emitted_metrics()
        step("every setting a function reads is a template parameter or a documented edit")
        self.check_settings_reachable()

    def move_to_projected(self, role):
        """README, Moving from secret to projected, steps 2 to 4 as written, in the shell of the
        secret-mode deploy: its cluster is registered (step 1, `projected_identity`); redeployed
        with IdentityMode=projected and ClusterName, the kubeconfig kept; the secret-mode
        registration stays, so the DELETE of a pod admitted in secret mode still removes its
        Secret; new pods get projected tokens; once `kubectl get secrets` lists no managed Secret,
        the projected registration replaces it (no DELETE webhook)."""
        step("README Moving from secret to projected, 2 as written: sam deploy IdentityMode="
             "projected ClusterName=..., every other parameter kept (the kubeconfig among them)")
        self.run_readme(self.migration[1:2], "Moving from secret to projected block 2")
        check(self.overrides == {"IdentityMode": "projected", "ClusterName": self.cluster},
              f"README's redeploy passes {self.overrides}: IdentityMode=projected and the "
              f"registered cluster's name {self.cluster} expected")
        check(self.outputs["IdentityMode"] == "projected"
              and self.outputs.get("ClusterName") == self.cluster
              and self.outputs.get("KubeconfigParameterName") == self.parameters[
                  "KubeconfigParameterName"]
              and "CleanupFunction" in self.functions,
              f"after the redeploy: outputs {self.outputs}, functions {sorted(self.functions)}")

        step("the move, the cluster's part: the secret-mode registration kept, a new pod "
             "projected, the secret-mode pods' workloads restarted")
        left = self.labelled_secrets(MANAGED_SECRETS)
        check(left, "no secret-mode pod is left to rehearse the move with")
        # the registration in the cluster is still the secret-mode one; re-rendered during the
        # move, it needs --identity-mode secret (the stack's output now says projected)
        secret_mode = yaml.safe_load(self.cli("render-webhook", "--identity-mode", "secret", extra_env={
            "WEBHOOK_PATH_SECRET": self.path_secret}).stdout)
        check(secret_mode == self.registration,
              "render-webhook --identity-mode secret differs from the secret-mode registration")
        pod, _ = self.create_pod("migrated", "app-sa")
        volumes = [v["name"] for v in pod["spec"].get("volumes", []) if "projected" in v]
        sidecar = next(c for c in pod["spec"]["containers"] if c["name"] == "iam-broker-proxy")
        check(volumes and "iam-broker.io/secret-name" not in pod["metadata"].get("annotations", {})
              and self.container_env(sidecar)["BROKER_URL"].endswith(
                  f"?role={urllib.parse.quote(role, safe=':/@,-._~')}"),
              f"a pod admitted after the redeploy did not get a projected token for the "
              f"ServiceAccount's role: {json.dumps(pod['spec'])[:400]}")
        print(f"    a new pod: projected token, role {role} from the ServiceAccount's annotation "
              f"(the webhook reads it with the kubeconfig); secret-mode Secrets left: "
              f"{', '.join(left)}", file=sys.stderr)
        status, pods = self.kube("GET", f"/api/v1/namespaces/{NAMESPACE}/pods")
        check(status == 200, f"listing pods: {status}")
        old = [p for p in pods["items"]
               if "iam-broker.io/secret-name" in (p["metadata"].get("annotations") or {})]
        for pod in old:
            check(self.delete_pod(pod), f"the DELETE of {pod['metadata']['name']} reached no "
                  "webhook: the secret-mode registration lost its DELETE webhook")
        print(f"    deleted {', '.join(p['metadata']['name'] for p in old)} through the kept "
              "DELETE webhook", file=sys.stderr)

        step("README Moving from secret to projected, 3 and 4 as written: kubectl get secrets "
             "lists nothing; render-webhook | kubectl apply -f -")
        self.run_readme(self.migration[2:], "Moving from secret to projected block 3")
        check(self.listed_secrets == [],
              f"Secrets of deleted secret-mode pods are left: {self.listed_secrets}")
        operations = [r["operations"] for h in self.registration["webhooks"] for r in h["rules"]]
        check(operations == [["CREATE"]], f"the projected registration registers {operations}")
        print("    kubectl get secrets -A -l app.kubernetes.io/managed-by=iam-broker: No resources "
              "found; render-webhook, from the IdentityMode output: Pod CREATE only",
              file=sys.stderr)

    def projected_identity(self, role, broker):
        """README, Moving from secret to projected, step 1 as written, in the shell of the
        secret-mode deploy: the cluster registered from its API server. Then projected identity
        on the secret-mode stack: the operator allows a ServiceAccount of the cluster; the
        kubelet's token for a pod of that ServiceAccount gets the role's credentials from the
        broker."""
        step("README Moving from secret to projected, 1 as written: kubectl apply the "
             "issuer-discovery identity, cluster add from the API server")
        self.migration = self.readme_blocks(
            "secret-to-projected", 3, "Moving from secret to projected's cluster add, redeploy, "
            "then the projected registration")
        order = [next((i for i, b in enumerate(self.migration) if command in b), None)
                 for command in ("cluster add", "sam deploy", "kubectl get secrets",
                                 "render-webhook")]
        check(order == [0, 1, 2, 2]
              and in_order(self.migration[2], ("get secrets", "render-webhook")),
              f"README's move is not cluster add; sam deploy; kubectl get secrets, render-webhook: "
              f"{order}")
        transcript = self.run_readme(self.migration[:1], "Moving from secret to projected block 1")
        check(MANIFESTS["issuer discovery"] in self.applied_files,
              f"README's move applied {self.applied_files}, not the issuer-discovery identity")
        check(self.kube_token not in transcript, "cluster add printed the kubeconfig's token")
        listed = json.loads(self.cli("cluster", "list", "--json").stdout)
        check(len(listed) == 1 and listed[0]["source"] == f"api-server {self.kube_server}",
              f"cluster list shows {listed}")
        self.cluster = listed[0]["name"]
        kubeconfig = os.path.join(self.shell.folder, "discovery.kubeconfig")
        again = self.cli("cluster", "add", self.cluster, "--kubeconfig", kubeconfig,
                         expect_ok=False)
        check(again.returncode != 0 and f"cluster refresh {self.cluster}" in again.stderr,
              f"a second cluster add was not refused: {again.stderr}")
        print(f"    cluster {self.cluster} registered from {self.kube_server}; a second "
              "cluster add is refused", file=sys.stderr)

        step("projected identity on the secret-mode stack: allow --cluster, a pod's projected "
             "token at the broker")
        self.cli("allow", "--cluster", self.cluster, "--namespace", NAMESPACE,
                 "--service-account", "app-sa", "--role", role)
        status, pod = self.kube("POST", f"/api/v1/namespaces/{NAMESPACE}/pods", {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "projected-1", "namespace": NAMESPACE},
            "spec": {"serviceAccountName": "app-sa",
                     "containers": [{"name": "app", "image": "busybox"}]}})
        check(status == 201, f"creating pod projected-1: {status} {pod}")
        audience = self.functions["BrokerFunction"].variables.get("PROJECTED_AUDIENCE", "iam-broker")
        token = self.token_request(pod, audience)
        status, headers, body = http_request("GET", broker,
                                             headers={"Authorization": f"Bearer {token}"})
        check(status == 200 and json.loads(body)["RoleArn"] == role,
              f"the broker answered a projected token {status} {body[:300]!r}")
        print(f"    the pod's projected token got {role}", file=sys.stderr)
        status, _, body = http_request("GET", broker, headers={
            "Authorization": f"Bearer {token[:-4]}AAAA"})
        check(status == 403 and json.loads(body)["Code"] == "InvalidToken",
              f"a forged projected token answered {status} {body!r}")

        step("projected identity, direct: the token file, the three SDKs at BrokerUrl?role=, "
             "the kubelet rotates the file")
        token_file = os.path.join(self.work, "projected-1-token")

        def kubelet_writes(value):
            # the kubelet swaps the projected file whole; readers never see half a token
            with open(token_file + ".new", "w", opener=lambda p, f: os.open(p, f, 0o600)) as f:
                f.write(value)
            os.replace(token_file + ".new", token_file)

        kubelet_writes(token)
        uri = f"{self.outputs['BrokerUrl']}?role={urllib.parse.quote(role, safe=':/@,-._~')}"
        env = self.direct_env({"AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE": token_file}, uri)
        before = len(self.served("projected-1"))
        self.three_sdks(env)
        rotated = self.token_request(pod, audience)
        check(rotated != token, "the kubelet's second TokenRequest returned the same token")
        kubelet_writes(rotated)
        print("    the kubelet rotated the token file", file=sys.stderr)
        self.three_sdks(env)
        caches = self.served("projected-1")[before:]
        check(len(caches) >= 6, f"the projected pod's direct fetches logged {caches}")
        print(f"    BrokerFunction cache for projected-1's direct fetches: {', '.join(caches)}",
              file=sys.stderr)

    def check_dashboard_and_alarms(self):
        """The template's dashboard and alarms as CloudWatch holds them: every `iam-broker` metric
        they read is one the functions write, under the one dimension they write it with
        (cloudwatch.EMF); the Lambda and API Gateway metrics are the stack's own functions' and
        API's; the alarms cover what issue 22 asks for and notify AlarmTopicArn only when set."""
        client = self.client("cloudwatch", self.admin)
        resources = self.expanded["Resources"]

        def logicals(kind):
            return [l for l, r in resources.items() if r["Type"] == kind and self.resolver.active(l)]

        functions = {self.resolver.physical[l] for l in logicals("AWS::Lambda::Function")}
        broker = self.resolver.physical["BrokerFunction"]
        api = resources[logicals("AWS::ApiGateway::RestApi")[0]]["Properties"]
        api_dimensions = {
            # API Gateway files a REST API's metrics under its name (the swagger title when the
            # template sets none) and the stage
            "ApiName": self.resolver.resolve(api.get("Name") or api["Body"]["info"]["title"]),
            "Stage": resources[logicals("AWS::ApiGateway::Stage")[0]]["Properties"]["StageName"],
        }

        def stack_metric_problems(namespace, metric, dimensions):
            if namespace == cloudwatch.NAMESPACE:
                return cloudwatch.emf_problems(metric, dimensions)
            if namespace == "AWS/Lambda":
                if set(dimensions) != {"FunctionName"} or dimensions["FunctionName"] not in functions:
                    return [f"AWS/Lambda {metric} {dimensions}: not one of the stack's functions "
                            f"{sorted(functions)}"]
                return []
            if namespace == "AWS/ApiGateway":
                if dimensions != api_dimensions:
                    return [f"AWS/ApiGateway {metric} {dimensions}: the stack's API is "
                            f"{api_dimensions}"]
                return []
            return [f"{namespace} {metric}: a namespace the stack writes nothing to"]

        # the dashboard
        name = self.outputs["DashboardName"]
        check(name == self.resolver.physical[logicals("AWS::CloudWatch::Dashboard")[0]],
              f"the DashboardName output {name} is not the dashboard the template creates")
        check(self.outputs["DashboardUrl"].endswith(f"#dashboards/dashboard/{name}")
              and f"region={self.region}" in self.outputs["DashboardUrl"],
              f"the DashboardUrl output {self.outputs['DashboardUrl']} does not open {name}")
        body = json.loads(client.get_dashboard(DashboardName=name)["DashboardBody"])
        metrics, searches, alarm_arns = cloudwatch.dashboard_references(body)
        problems = cloudwatch.dashboard_problems(body)
        for namespace, metric, dimensions, _ in metrics:
            problems += stack_metric_problems(namespace, metric, dimensions)
        check(not problems, f"dashboard {name}:\n    " + "\n    ".join(problems))
        shown = cloudwatch.dashboard_metric_names(body)
        check(shown == set(cloudwatch.EMF), f"dashboard {name} shows {sorted(shown)}; the "
              f"functions write {sorted(cloudwatch.EMF)}")
        for metric in ("Duration", "Errors", "Throttles", "ConcurrentExecutions"):
            of = {d.get("FunctionName") for ns, m, d, _ in metrics
                  if (ns, m) == ("AWS/Lambda", metric)}
            check(of == functions, f"dashboard {name}: Lambda {metric} of {sorted(of)}, the stack's "
                  f"functions are {sorted(functions)}")
        api_shown = {m for ns, m, _, _ in metrics if ns == "AWS/ApiGateway"}
        check({"4XXError", "5XXError"} <= api_shown,
              f"dashboard {name}: API Gateway {sorted(api_shown)}")
        regions = {w["properties"].get("region") for w in body["widgets"]
                   if w.get("type") == "metric"}
        check(regions == {self.region}, f"dashboard {name}: widgets of regions {regions}")
        print(f"    dashboard {name}: {len(body['widgets'])} widgets; iam-broker "
              f"{', '.join(sorted(shown))} ({len(searches)} SEARCH expressions), Lambda metrics of "
              f"{len(functions)} functions, API {api_dimensions['ApiName']}/"
              f"{api_dimensions['Stage']}", file=sys.stderr)

        # the alarms
        names = self.outputs["AlarmNames"].split(",")
        created = {self.resolver.physical[l] for l in logicals("AWS::CloudWatch::Alarm")}
        check(set(names) == created and len(names) == len(created),
              f"the AlarmNames output {names} is not the template's alarms {sorted(created)}")
        alarms = client.describe_alarms(AlarmNames=names)["MetricAlarms"]
        check(sorted(a["AlarmName"] for a in alarms) == sorted(names),
              f"DescribeAlarms returned {[a['AlarmName'] for a in alarms]}, expected {names}")
        check(sorted(alarm_arns) == sorted(a["AlarmArn"] for a in alarms),
              f"dashboard {name}'s alarm widget shows {alarm_arns}")
        self.alarm_reads = []
        for alarm in alarms:
            what = alarm["AlarmName"]
            reads = cloudwatch.alarm_references(alarm)
            check(reads, f"alarm {what} reads no metric")
            problems = [p for ns, m, d, _ in reads for p in stack_metric_problems(ns, m, d)]
            check(not problems, f"alarm {what}:\n    " + "\n    ".join(problems))
            check(alarm.get("TreatMissingData") == "notBreaching",
                  f"alarm {what} treats missing data as {alarm.get('TreatMissingData')}")
            check(alarm.get("AlarmDescription"), f"alarm {what} has no description")
            # this rehearsal leaves AlarmTopicArn empty: nobody to notify
            check(not alarm.get("AlarmActions") and not alarm.get("OKActions"),
                  f"alarm {what} notifies {alarm.get('AlarmActions')} {alarm.get('OKActions')} "
                  "though AlarmTopicArn is empty")
            self.alarm_reads += [(ns, m, d, stat, what) for ns, m, d, stat in reads]
            print(f"    alarm {what}: " + ", ".join(
                f"{m} {','.join(f'{k}={v}' for k, v in d.items() if k != 'ApiName')} {stat}"
                for _, m, d, stat in reads), file=sys.stderr)
        wanted = {
            "the API's 5xx rate": [("AWS/ApiGateway", "5XXError", api_dimensions),
                                   ("AWS/ApiGateway", "Count", api_dimensions)],
            "AssumeRoleFailed": [("iam-broker", "CredentialsDenied", {"Code": "AssumeRoleFailed"})],
            "STS throttling": [("iam-broker", "StsErrors", {"AwsCode": "Throttling"})],
            "the broker's p99 duration": [("AWS/Lambda", "Duration", {"FunctionName": broker})],
            "corrupt rows": [("iam-broker", "CorruptTokenRecords", {"Table": "Authorizations"}),
                             ("iam-broker", "CorruptAllowanceRows", {"Table": "Allowances"})],
        }
        for what, needed in wanted.items():
            for metric in needed:
                check(any(r[:3] == metric for r in self.alarm_reads),
                      f"no alarm reads {what}: {metric}")
        durations = {r[3] for r in self.alarm_reads if r[:3] == wanted["the broker's p99 duration"][0]}
        check(durations == {"p99"}, f"the broker's duration alarm reads {durations}, not p99")

        # with AlarmTopicArn set, every alarm notifies it, into ALARM and back to OK
        topic = f"arn:aws:sns:{self.region}:{cfn.ACCOUNT}:iam-broker-alarms"
        notifying = cfn.Resolver(self.expanded, {**self.parameters, "AlarmTopicArn": topic},
                                 self.stack, self.region)
        notifying.physical, notifying.attributes = self.resolver.physical, self.resolver.attributes
        for logical in logicals("AWS::CloudWatch::Alarm"):
            p = notifying.resolve(resources[logical]["Properties"])
            check(p.get("AlarmActions") == [topic] and p.get("OKActions") == [topic],
                  f"with AlarmTopicArn set, alarm {logical} notifies {p.get('AlarmActions')} / "
                  f"{p.get('OKActions')}")
        print(f"    with AlarmTopicArn set, all {len(created)} alarms notify it (ALARM and OK)",
              file=sys.stderr)

    def check_emitted_metrics(self):
        """The EMF lines the functions wrote on stdout during the rehearsal: each is a metric the
        dashboard knows under the dimension it reads, and what this path exercised is there (the
        alarms' metrics among them)."""
        seen = {}
        for function in self.functions.values():
            with open(os.path.join(self.work, f"{function.logical}.log"), errors="replace") as f:
                emitted, problems = cloudwatch.emitted(f.read().splitlines())
            for (metric, dimension, value), count in emitted.items():
                problems += cloudwatch.emf_problems(metric, {dimension: value})
                seen[(metric, dimension, value)] = seen.get((metric, dimension, value), 0) + count
            check(not problems, f"{function.logical}'s metrics are not what the dashboard and the "
                  "alarms read (update template.yaml and rehearse_deploy/cloudwatch.py EMF "
                  "together):\n    " + "\n    ".join(problems[:10]))
            if emitted:
                print(f"    {function.logical}: " + ", ".join(
                    f"{m} {d}={v} x{n}" for (m, d, v), n in sorted(emitted.items())), file=sys.stderr)
        required = {
            ("CredentialsServed", "Outcome", "served"): "pods were served",
            ("BrokerLatency", "Outcome", "served"): "pods were served",
            ("CredentialsDenied", "Code", "InvalidToken"): "a revoked and a forged token",
            ("CredentialsDenied", "Code", "AssumeRoleFailed"): "a role outside AllowedRoleArnPattern",
            ("Admissions", "Decision", "patched"): "the first pod was injected",
            ("AdmissionLatency", "Decision", "patched"): "the first pod was injected",
            ("Admissions", "Decision", "cleaned_up"): "the first pod's DELETE",
        }
        # StsErrors is counted once the broker writes it: then the role outside the pattern
        # (moto's IAM refuses the AssumeRole) shows as STS's own code
        sources = glob.glob(os.path.join(self.root, "crates", "**", "*.rs"), recursive=True)
        if any('"StsErrors"' in open(path, errors="replace").read() for path in sources):
            required[("StsErrors", "AwsCode", "AccessDenied")] = \
                "STS refused the role outside AllowedRoleArnPattern"
        else:
            print("    (no crate writes StsErrors yet: its rehearsal check is skipped)",
                  file=sys.stderr)
        missing = [f"{m} {d}={v} ({why})" for (m, d, v), why in required.items()
                   if (m, d, v) not in seen]
        check(not missing, "the functions did not write: " + "; ".join(missing))
        # every alarm's iam-broker metric was written as the alarm reads it, but for what this
        # path cannot provoke
        not_on_this_path = {
            ("StsErrors", "AwsCode", "Throttling"): "moto does not throttle",
            ("CorruptTokenRecords", "Table", "Authorizations"): "no token record is corrupt",
            ("CorruptAllowanceRows", "Table", "Allowances"): "no allowance row is corrupt",
        }
        written, unexercised = set(), set()
        for namespace, metric, dimensions, _, alarm in self.alarm_reads:
            if namespace != cloudwatch.NAMESPACE:
                continue
            (dimension, value), = dimensions.items()
            key = (metric, dimension, value)
            if key in seen:
                written.add(f"{metric} {dimension}={value}")
                continue
            check(key in not_on_this_path,
                  f"alarm {alarm} reads {metric} {dimension}={value}, which the functions did not "
                  f"write on this path (they wrote {sorted(k for k in seen if k[0] == metric)})")
            unexercised.add(f"{metric} {dimension}={value} ({not_on_this_path[key]})")
        print(f"    every metric written is one the dashboard reads; the alarms' "
              f"{', '.join(sorted(written))} written; not provoked here: "
              f"{', '.join(sorted(unexercised))}", file=sys.stderr)

    def check_settings_reachable(self):
        with open(os.path.join(self.root, "crates/kernel/src/config.rs")) as f:
            names = set(re.findall(r'pub const ENV_\w+: &str = "(\w+)";', f.read()))
        check(len(names) > 10, "found no ENV_ constants in crates/kernel/src/config.rs")
        with open(os.path.join(self.root, "README.md")) as f:
            readme = f.read()
        section = readme.split("### Settings without a template parameter", 1)
        check(len(section) == 2, "README has no section 'Settings without a template parameter'")
        documented = set(re.findall(r"^\| `(\w+)` \|", section[1].split("\n## ", 1)[0], re.M))
        set_by_template = set()
        for function in self.functions.values():
            set_by_template |= set(function.variables)
        missing = sorted(names - set_by_template - documented)
        check(not missing, f"settings neither in template.yaml nor documented as edits: {missing}")
        print(f"    {len(names & set_by_template)} set by template.yaml, "
              f"{len(names & documented)} documented as template edits", file=sys.stderr)


class ProjectedFirst(Rehearsal):
    """README's projected-first path (Deploy, steps 1 to 5) on a second stack, in the same moto
    and against the same cluster as the first: README's blocks run as written, as one script in
    a fresh operator's shell (readme_shell), `sam deploy` with no KubeconfigParameterName; then
    the API server's and the kubelet's part for the pods of step 5."""

    def __init__(self, first):
        super().__init__(first.args, os.path.join(first.work, "projected-first"))
        os.makedirs(self.work)
        # the first stack's AWS (moto) and cluster (the Kubernetes API stand-in)
        for name in ("endpoint", "admin", "lambda_service", "admin_kubeconfig", "kube_server",
                     "kube_ca", "kube_token", "kube_tls"):
            setattr(self, name, getattr(first, name))
        # README's two paths are alternatives for one stack (one name, one region): the first
        # goes, as `sam delete` would take it, before README's sam deploy creates this one
        first.client("cloudformation", first.admin).delete_stack(StackName=first.stack)

    # ------------------------------------------------------------------ the rehearsal
    def run(self):
        step("README Deploy, projected first: steps 1 to 4 as written, one script in a fresh bash")
        script = self.readme_blocks("projected-first", 4, "Deploy's steps 1 to 4")
        # no pod is admitted before its cluster is registered and its role allowed
        order = [next((i for i, b in enumerate(script) if command in b), None)
                 for command in ("sam deploy", "cluster add", "iam-broker allow", "render-webhook")]
        check(None not in order and order == sorted(order) and len(set(order)) == 4,
              f"README's steps 1 to 4 are not deploy, cluster add, allow, render-webhook: {order}")
        transcript = self.run_readme(script, "projected-first script")
        # iam-broker doctor, in step 2: the registration, and no Kubernetes to check
        for line in ("cluster registration: {} is registered", "Kubernetes: not called"):
            line = line.format(self.outputs["ClusterName"])
            check(doctor_said_ok(transcript, line), f"iam-broker doctor did not say `ok {line}`")

        step("the projected-first stack: no kubeconfig, no SSM, no cleanup; the registration")
        self.check_cluster_free_stack()
        step("the dashboard and the alarms of a stack with two functions")
        self.check_dashboard_and_alarms()

        step("README Deploy 5: pods and their roles, admitted by a webhook that never calls the "
             "cluster")
        self.pods_and_roles()
        step("every call the projected-first stack's functions made was allowed")
        for function in self.functions.values():
            with open(os.path.join(self.work, f"{function.logical}.log"), errors="replace") as f:
                lines = f.read().splitlines()
            troubles = [line for line in lines if "AccessDenied" in line
                        and cloudwatch.emf_record(line) is None
                        or '"level":"WARN"' in line or '"level":"ERROR"' in line]
            check(not troubles, f"{function.logical} logged trouble:\n" + "\n".join(troubles[:5]))
            check(not any("panicked" in line for line in lines), f"{function.logical} panicked")
            print(f"    {function.logical}: {len(lines)} log lines, no AccessDenied, no warning",
                  file=sys.stderr)

    def check_cluster_free_stack(self):
        """What README's step 1 deployed is the cluster-free stack of issue 23, and steps 2 to 4
        left the cluster with nothing of the webhook's but its registration."""
        overrides = self.overrides
        check(overrides.get("IdentityMode") == "projected" and overrides.get("ClusterName")
              and not overrides.get("KubeconfigParameterName"),
              f"README's sam deploy passes {sorted(overrides)}: expected IdentityMode=projected, "
              "ClusterName and no KubeconfigParameterName")
        check(self.outputs.get("IdentityMode") == "projected"
              and self.outputs.get("ClusterName") == overrides["ClusterName"]
              and "KubeconfigParameterName" not in self.outputs,
              f"the stack's outputs: {self.outputs}")
        check(set(self.functions) == {"BrokerFunction", "WebhookFunction"},
              f"the stack runs {sorted(self.functions)}: no CleanupFunction without a kubeconfig")
        webhook = self.functions["WebhookFunction"]
        check(not {"KUBECONFIG_PARAMETER", "KUBECONFIG"} & set(webhook.variables),
              f"the webhook function is given a kubeconfig: {sorted(webhook.variables)}")
        role = self.resolver.resolve(self.expanded["Resources"]["WebhookFunctionRole"]["Properties"])
        actions = {a for policy in role.get("Policies", [])
                   for statement in policy["PolicyDocument"]["Statement"]
                   for a in ([statement["Action"]] if isinstance(statement["Action"], str)
                             else statement["Action"])}
        check(actions == {"dynamodb:GetItem", "dynamodb:BatchGetItem"},
              f"the webhook's role may {sorted(actions)}; without a kubeconfig: read Allowances only")
        credentials = webhook.credentials
        for what, call in {
            "webhook cannot read an SSM parameter": lambda: self.client("ssm", credentials)
            .get_parameter(Name="/iam-broker/webhook-kubeconfig", WithDecryption=True),
            "webhook cannot write token records": lambda: self.client("dynamodb", credentials)
            .put_item(TableName=self.outputs["AuthorizationsTableName"],
                      Item={"token_hash": {"S": "0" * 64}}),
        }.items():
            check(denied(call), f"expected AccessDenied: {what}")
            print(f"    denied as it should be: {what}", file=sys.stderr)
        print(f"    outputs IdentityMode={self.outputs['IdentityMode']} ClusterName="
              f"{self.outputs['ClusterName']}, no KubeconfigParameterName; functions "
              f"{', '.join(sorted(self.functions))}; the webhook's role: {', '.join(sorted(actions))} "
              "on Allowances", file=sys.stderr)
        applied = sorted(set(self.applied_files))
        check(applied == sorted([MANIFESTS["namespace"], MANIFESTS["issuer discovery"]]),
              f"README applied {applied}: a cluster-free webhook needs no identity and no RBAC")
        hooks = self.registration["webhooks"] if self.registration else []
        check(len(hooks) == 1 and hooks[0]["sideEffects"] == "None"
              and [r["operations"] for r in hooks[0]["rules"]] == [["CREATE"]],
              f"render-webhook did not register the projected webhook (CREATE only, sideEffects "
              f"None): {json.dumps(hooks)[:400]}")
        check(hooks[0]["clientConfig"]["url"] == self.outputs["WebhookUrlWithoutSecret"]
              + self.path_secret, f"the registration calls {hooks[0]['clientConfig']['url']}")
        listed = json.loads(self.cli("cluster", "list", "--output", "json").stdout)
        check([c["name"] for c in listed] == [self.outputs["ClusterName"]],
              f"the Clusters table holds {listed}")
        print(f"    kubectl applied {', '.join(applied)}; registration {hooks[0]['name']}: Pod "
              f"CREATE, sideEffects None; cluster {listed[0]['name']} registered", file=sys.stderr)

    def pods_and_roles(self):
        """README step 5: the one allowed role, two allowed roles and no annotation (skipped, the
        warning), the pod's annotation; each token the kubelet mounts is served by the broker."""
        cluster = self.outputs["ClusterName"]
        rows = json.loads(self.cli("allowances", "--output", "json").stdout)
        check(len(rows) == 1 and rows[0]["service_account"] == "app-sa",
              f"README's allow left {rows}")
        (reader,) = rows[0]["allowed_roles"]
        # the operator's IAM part: the roles trust this stack's broker too
        iam = self.client("iam", self.admin)
        trust = {"Version": "2012-10-17", "Statement": [{
            "Effect": "Allow", "Principal": {"AWS": self.outputs["BrokerFunctionRoleArn"]},
            "Action": ["sts:AssumeRole", "sts:TagSession"]}]}
        check(reader.endswith(f":role/iam-broker/{ALLOWED_ROLE_NAME}"), f"README allows {reader}")
        # one statement naming both brokers (moto reads a statement naming another principal as
        # a deny, where IAM would pass over it)
        (statement,) = iam.get_role(RoleName=ALLOWED_ROLE_NAME)["Role"][
            "AssumeRolePolicyDocument"]["Statement"]
        principals = statement["Principal"]["AWS"]
        statement["Principal"]["AWS"] = [*([principals] if isinstance(principals, str)
                                           else principals), self.outputs["BrokerFunctionRoleArn"]]
        iam.update_assume_role_policy(RoleName=ALLOWED_ROLE_NAME, PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [statement]}))
        writer = iam.create_role(RoleName="s3_writer", Path="/iam-broker/",
                                 AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]
        audience = self.functions["WebhookFunction"].variables.get("PROJECTED_AUDIENCE",
                                                                   "iam-broker")

        def patched(pod, role):
            check(pod["metadata"].get("labels", {}).get("iam-broker.io/injected") == "true",
                  f"pod {pod['metadata']['name']} was not injected: {self.warnings}")
            volumes = [v for v in pod["spec"].get("volumes", []) if "projected" in v]
            sources = [s["serviceAccountToken"] for v in volumes for s in v["projected"]["sources"]]
            check([s["audience"] for s in sources] == [audience],
                  f"pod {pod['metadata']['name']}'s projected token: {sources}")
            sidecar = next(c for c in pod["spec"]["containers"] if c["name"] == "iam-broker-proxy")
            url = self.container_env(sidecar)["BROKER_URL"]
            check(url == f"{self.outputs['BrokerUrl']}?role={urllib.parse.quote(role, safe=':/@,-._~')}",
                  f"pod {pod['metadata']['name']}'s sidecar calls {url}")

        def served(pod, role):
            token_file = os.path.join(self.work, f"{pod['metadata']['name']}-token")
            with open(token_file, "w", opener=lambda p, f: os.open(p, f, 0o600)) as f:
                f.write(self.token_request(pod, audience))
            result = self.run_pod(pod, token_file)
            check(result.returncode == 0, f"aws sts get-caller-identity in pod "
                  f"{pod['metadata']['name']} failed:\n{result.stderr}")
            arn = json.loads(result.stdout)["Arn"]
            check(f":assumed-role/{role.rsplit('/', 1)[1]}/" in arn,
                  f"pod {pod['metadata']['name']} is {arn}, not a session of {role}")
            return arn

        pod, hooks = self.create_pod("pf-reports", "app-sa")
        check(hooks, "no webhook of the registration matched the pod's CREATE")
        patched(pod, reader)
        check(not self.warnings, f"kubectl would warn: {self.warnings}")
        print(f"    app-sa (one role allowed), no annotation: the sidecar asks for {reader}; "
              f"the pod is {served(pod, reader)}", file=sys.stderr)

        # a ServiceAccount allowed two roles, annotated in the cluster: the annotation the
        # webhook would follow if it read ServiceAccounts
        annotation = self.functions["WebhookFunction"].variables["ROLE_ARN_ANNOTATION"]
        status, answer = self.kube("POST", f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts", {
            "metadata": {"name": "multi-sa", "namespace": NAMESPACE,
                         "annotations": {annotation: reader}}})
        check(status == 201, f"creating multi-sa: {status} {answer}")
        for role in (reader, writer):
            self.cli("allow", "--cluster", cluster, "--namespace", NAMESPACE,
                     "--service-account", "multi-sa", "--role", role)
        status, before = self.kube("GET", f"/api/v1/namespaces/{NAMESPACE}/events")
        pod, _ = self.create_pod("pf-unnamed", "multi-sa")
        check(pod["metadata"].get("labels", {}).get("iam-broker.io/injected") is None
              and not any(c["name"] == "iam-broker-proxy" for c in pod["spec"]["containers"]),
              "a pod of a ServiceAccount allowed two roles, naming none, was injected")
        check(len(self.warnings) == 1 and "is allowed 2 roles" in self.warnings[0]
              and "iam-broker.io/role-arn" in self.warnings[0],
              f"kubectl would print {self.warnings}")
        status, after = self.kube("GET", f"/api/v1/namespaces/{NAMESPACE}/events")
        check(len(after["items"]) == len(before["items"]), "the projected webhook wrote an Event")
        print(f"    multi-sa (two roles, the ServiceAccount annotated), no pod annotation: not "
              f"injected, no Event; Warning: {self.warnings[0]}", file=sys.stderr)

        pod, _ = self.create_pod("pf-named", "multi-sa",
                                 annotations={"iam-broker.io/role-arn": writer})
        patched(pod, writer)
        print(f"    multi-sa, iam-broker.io/role-arn: {writer}: the pod is "
              f"{served(pod, writer)}", file=sys.stderr)


def selector_matches(selector, labels):
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator = expression["key"], expression["operator"]
        values = expression.get("values", [])
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and key in labels and labels[key] in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=".")
    parser.add_argument("--bin", default="target/debug")
    parser.add_argument("--moto-server", required=True)
    parser.add_argument("--aws", default=shutil.which("aws") or "aws")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="iam-broker-rehearsal-")
    rehearsal = Rehearsal(args, work)
    stacks = [rehearsal]
    try:
        rehearsal.run()
        stacks.append(ProjectedFirst(rehearsal))
        stacks[-1].run()
        step("the deploy rehearsal passed")
        return 0
    except (RehearsalFailed, cfn.Unresolvable, InvocationError,
            botocore.exceptions.ClientError) as error:
        print(f"deploy rehearsal FAILED: {error}\n(logs in {work})", file=sys.stderr)
        args.keep = True
        return 1
    finally:
        for stack in reversed(stacks):
            stack.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
