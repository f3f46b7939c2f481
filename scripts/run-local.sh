#!/usr/bin/env bash
# Runs the whole system locally, the way a cluster would use it:
#   moto (a local AWS: DynamoDB, STS) + a local Kubernetes API stand-in (HTTPS)
#   -> `iam-broker serve` receives a Pod CREATE admission, mints a token, creates the Secret,
#      records the token and answers the patch
#   -> the token is read back from the Secret the webhook created
#   -> `iam-broker-proxy` (the sidecar) serves container credentials on loopback
#   -> the AWS CLI, configured only with the variables the patch injects, runs
#      `aws sts get-caller-identity` and prints the assumed role.
# With --projected, the identity mode without Secrets: the cluster is registered
# (`iam-broker cluster add --kubeconfig`), the webhook answers a patch that mounts a projected
# ServiceAccount token and writes nothing, the stand-in issues the pod's token as kubelet would
# (TokenRequest), and the AWS CLI reads it from the file; then the cluster rotates its signing
# key, `iam-broker cluster refresh` picks it up and the rotated token works.
#   scripts/run-local.sh             keep everything running until Ctrl-C when run from a terminal
#   scripts/run-local.sh --once      stop after printing the identity
#   scripts/run-local.sh --projected projected ServiceAccount tokens instead of Secrets
#   scripts/run-local.sh --help      print this text
set -euo pipefail
source "$(dirname "$0")/lib.sh"
once=0
projected=0
for arg in "$@"; do
  case "$arg" in
    --once) once=1 ;;
    --projected) projected=1 ;;
    -h|--help) usage; exit 0 ;;
    *) refuse_argument "$arg" ;;
  esac
done
[ -t 0 ] || once=1
cd "$ROOT"

ensure_rust
ensure_venv
log "building iam-broker, iam-broker-proxy and the Kubernetes API stand-in"
cargo build --quiet --bins
BIN="$ROOT/target/debug"

start_work
start_moto
ROLE=arn:aws:iam::123456789012:role/iam-broker/s3_reader

log "iam-broker tables create; iam-broker allow --namespace team-a --service-account app --role $ROLE"
"$BIN/iam-broker" tables create
"$BIN/iam-broker" allow --namespace team-a --service-account app --role "$ROLE"

log "starting the Kubernetes API stand-in; ServiceAccount team-a/app annotated eks.amazonaws.com/role-arn=$ROLE"
start_kube_standin "$BIN/kube-api-standin" "team-a/app=$ROLE"

if [ "$projected" = 1 ]; then
  export IDENTITY_MODE=projected CLUSTER_NAME=local
  log "iam-broker cluster add local --kubeconfig (issuer and keys from the API server's discovery endpoints)"
  "$BIN/iam-broker" cluster add local --kubeconfig "$work/kubeconfig"
fi

serve_port=$(free_port)
log "iam-broker serve --listen 127.0.0.1:$serve_port (broker and webhook${IDENTITY_MODE:+, IDENTITY_MODE=$IDENTITY_MODE})"
KUBECONFIG="$work/kubeconfig" PROXY_IMAGE=iam-broker-proxy:local \
  "$BIN/iam-broker" serve --listen "127.0.0.1:$serve_port" 2> "$work/serve.log" &
pids+=($!)
wait_http "http://127.0.0.1:$serve_port/healthz"

log "POST / with a Pod CREATE AdmissionReview (events/admission-create.json)"
python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["body"])' events/admission-create.json > "$work/review.json"
curl -sS -H 'Content-Type: application/json' --data-binary @"$work/review.json" \
  "http://127.0.0.1:$serve_port/" > "$work/answer.json"

if [ "$projected" = 1 ]; then
# Apply the patch, store the pod in the stand-in (as the API server would), then act as
# kubelet: request the pod's token (TokenRequest, bound to the pod) and write it to the file.
python3 - "$work" <<'PY'
import base64, json, sys
sys.path.insert(0, "scripts")
from standin_api import Api, admission_patch
work = sys.argv[1]
answer, patch = admission_patch(f"{work}/answer.json")
pod = json.load(open(f"{work}/review.json"))["request"]["object"]
def add(doc, path, value):
    *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]
    for key in parents:
        doc = doc[int(key)] if isinstance(doc, list) else doc[key]
    if isinstance(doc, list):
        doc.append(value) if last == "-" else doc.insert(int(last), value)
    else:
        doc[last] = value
for op in patch:
    assert op["op"] == "add", op
    add(pod, op["path"], op["value"])
print(f"allowed={answer['allowed']}, {len(patch)} operations; nothing written by the webhook", file=sys.stderr)
volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "iam-broker-token")
source = volume["projected"]["sources"][0]["serviceAccountToken"]
print(f"  volume iam-broker-token: projected serviceAccountToken {json.dumps(source)}", file=sys.stderr)
sidecar = next(c for c in pod["spec"]["containers"] if c["name"] == "iam-broker-proxy")
broker_url = next(e["value"] for e in sidecar["env"] if e["name"] == "BROKER_URL")
pod["metadata"].setdefault("name", pod["metadata"].get("generateName", "app-") + "7d9f")
pod["metadata"]["namespace"] = "team-a"
stored = Api(f"{work}/kubeconfig").request("POST", "/api/v1/namespaces/team-a/pods", pod)
name, uid = stored["metadata"]["name"], stored["metadata"]["uid"]
json.dump({"name": name, "uid": uid, "audience": source["audience"],
           "expirationSeconds": source["expirationSeconds"]}, open(f"{work}/pod.json", "w"))
open(f"{work}/broker_url", "w").write(broker_url)
print(f"pod team-a/{name} uid {uid}; the sidecar will call {broker_url}", file=sys.stderr)
PY
# kubelet's refresh: a TokenRequest bound to the pod, written to the token file.
kubelet_refresh() {
  python3 - "$work" <<'PY'
import base64, json, sys
sys.path.insert(0, "scripts")
from standin_api import Api
work = sys.argv[1]
pod = json.load(open(f"{work}/pod.json"))
body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {
    "audiences": [pod["audience"]], "expirationSeconds": pod["expirationSeconds"],
    "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": pod["name"], "uid": pod["uid"]}}}
answer = Api(f"{work}/kubeconfig").request("POST", "/api/v1/namespaces/team-a/serviceaccounts/app/token", body)
token = answer["status"]["token"]
header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
open(f"{work}/projected-token", "w").write(token)
print(f"kubelet wrote the pod's projected token (alg {header['alg']}, kid {header['kid'][:12]}…)", file=sys.stderr)
PY
}
kubelet_refresh

proxy_port=$(free_port)
log "iam-broker-proxy (the sidecar) on 127.0.0.1:$proxy_port -> $(cat "$work/broker_url")"
BROKER_URL="$(cat "$work/broker_url")" LISTEN_ADDR="127.0.0.1:$proxy_port" \
  "$BIN/iam-broker-proxy" 2> "$work/proxy.log" &
pids+=($!)
wait_http "http://127.0.0.1:$proxy_port/healthz"

whoami() {
  env -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY \
    AWS_CONTAINER_CREDENTIALS_FULL_URI="http://127.0.0.1:$proxy_port/" \
    AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE="$work/projected-token" \
    AWS_DEFAULT_REGION=us-east-1 AWS_CONFIG_FILE=/dev/null AWS_SHARED_CREDENTIALS_FILE=/dev/null \
    "$VENV/bin/aws" sts get-caller-identity --output json
}
log "aws sts get-caller-identity, with only the variables the webhook injected (the token as a file)"
whoami

log "the cluster rotates its signing key; iam-broker cluster refresh local; kubelet rewrites the token"
python3 -c 'import sys; sys.path.insert(0, "scripts"); from standin_api import Api
Api(sys.argv[1]).request("POST", "/standin/v1/rotate-signing-key")' "$work/kubeconfig"
"$BIN/iam-broker" cluster refresh local --kubeconfig "$work/kubeconfig"
sleep 1 # a broker re-reads the registry for an unknown key at most once a second
kubelet_refresh
log "aws sts get-caller-identity with the rotated token, nothing restarted"
whoami
else
# Decode the patch, and read the token from the Secret the webhook created (as the kubelet would).
python3 - "$work" <<'PY'
import base64, json, sys
sys.path.insert(0, "scripts")
from standin_api import Api, admission_patch
work = sys.argv[1]
answer, patch = admission_patch(f"{work}/answer.json")
print(f"allowed={answer['allowed']} patchType={answer['patchType']}, {len(patch)} operations:", file=sys.stderr)
for op in patch:
    value = op["value"]
    if isinstance(value, list):
        value = value[0] if len(value) == 1 else {"name": f"{len(value)} items"}
    shown = value.get("name", "") if isinstance(value, dict) else value
    print(f"  {op['op']} {op['path']} {shown}", file=sys.stderr)
def annotated_secret(op):
    if op["path"] == "/metadata/annotations":
        return op["value"].get("iam-broker.io/secret-name")
    if op["path"].endswith("iam-broker.io~1secret-name"):
        return op["value"]
    return None
secret = next(filter(None, map(annotated_secret, patch)))
sidecar = next(op["value"] for op in patch if isinstance(op["value"], dict) and op["value"].get("name") == "iam-broker-proxy")
broker_url = next(e["value"] for e in sidecar["env"] if e["name"] == "BROKER_URL")
obj = Api(f"{work}/kubeconfig").request("GET", f"/api/v1/namespaces/team-a/secrets/{secret}")
open(f"{work}/token", "w").write(base64.b64decode(obj["data"]["token"]).decode())
open(f"{work}/broker_url", "w").write(broker_url)
print(f"Secret team-a/{secret} holds the pod's token; the sidecar will call {broker_url}", file=sys.stderr)
PY

proxy_port=$(free_port)
log "iam-broker-proxy (the sidecar) on 127.0.0.1:$proxy_port -> $(cat "$work/broker_url")"
BROKER_URL="$(cat "$work/broker_url")" LISTEN_ADDR="127.0.0.1:$proxy_port" \
  "$BIN/iam-broker-proxy" 2> "$work/proxy.log" &
pids+=($!)
wait_http "http://127.0.0.1:$proxy_port/healthz"

log "aws sts get-caller-identity, with only the variables the webhook injected"
env -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY \
  AWS_CONTAINER_CREDENTIALS_FULL_URI="http://127.0.0.1:$proxy_port/" \
  AWS_CONTAINER_AUTHORIZATION_TOKEN="$(cat "$work/token")" \
  AWS_DEFAULT_REGION=us-east-1 AWS_CONFIG_FILE=/dev/null AWS_SHARED_CREDENTIALS_FILE=/dev/null \
  "$VENV/bin/aws" sts get-caller-identity --output json

fi

if [ "$once" = 0 ]; then
  log "running: broker+webhook http://127.0.0.1:$serve_port, sidecar http://127.0.0.1:$proxy_port, moto $AWS_ENDPOINT_URL"
  if [ "$projected" = 1 ]; then
    echo "  curl -H \"Authorization: \$(cat $work/projected-token)\" http://127.0.0.1:$proxy_port/" >&2
  else
    echo "  curl -H \"Authorization: \$(cat $work/token)\" http://127.0.0.1:$proxy_port/" >&2
  fi
  log "Ctrl-C to stop"
  wait "${pids[0]}"
fi
