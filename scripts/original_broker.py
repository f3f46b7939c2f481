"""The original broker (cuppett/ocp-iam-broker, seed 000's design), as a benchmark subject.

Run by scripts/bench-original.sh with the original's own dependencies (requirements-bench.txt:
boto3, kubernetes, jsonpatch) in .venv-bench, against the same moto as iam-broker.

With ORIGINAL_SRC pointing at a checkout of the original project, its own `index.handler` is
imported and called. Without it, this file's reproduction of the original's credential path is:
what it does per request, not its code (which is not ours to copy):

- at import: the Lambda module imports boto3 and, through the webhook module, the Kubernetes
  client and jsonpatch;
- per request: a new boto3 DynamoDB client, GetItem of the raw token (the original stores tokens
  in clear), an UpdateItem that slides `expires` and sets `last_accessed` on every call, a new STS
  client, AssumeRole (900 s, the token as session name), and the ECS-shaped answer with
  `Cache-control: max-age` five minutes short of the expiry.

Both are called in-process, with no HTTP server in front (which flatters the original: iam-broker
is measured behind its HTTP server).

    python original_broker.py setup TABLE TOKEN ROLE   # table and the token's row
    python original_broker.py run TOKEN REQUESTS       # prints FIRST, then the figures as JSON
"""

import datetime
import json
import math
import os
import resource
import sys
import time

# What the original Lambda imports before its handler runs (index -> broker, webhook).
import boto3
import jsonpatch  # noqa: F401  (imported by the original's webhook module)
from kubernetes import client as _kube_client, config as _kube_config  # noqa: F401

_TABLE = os.getenv("AUTH_TABLE", "role_perms")
_SLIDE_DAYS = 14
_DURATION = 900


def _role_for(token):
    """The original's token lookup: a fresh client, GetItem, then the sliding update."""
    dynamodb = boto3.client("dynamodb")
    found = dynamodb.get_item(TableName=_TABLE, Key={"auth_token": {"S": token}})
    if "Item" not in found:
        return None
    now = datetime.datetime.now()
    dynamodb.update_item(
        TableName=_TABLE,
        Key={"auth_token": {"S": token}},
        UpdateExpression="set expires = :e, last_accessed = :l",
        ExpressionAttributeValues={
            ":e": {"N": str(math.floor((now + datetime.timedelta(days=_SLIDE_DAYS)).timestamp()))},
            ":l": {"N": str(math.floor(now.timestamp()))},
        },
        ReturnValues="NONE",
    )
    return found["Item"]["role_arn"]["S"]


def reproduced_handler(event, _context):
    """API Gateway proxy event in, proxy response out, as the original's GET path answers."""
    headers = {"Content-Type": "application/json"}
    token = (event.get("headers") or {}).get("Authorization")
    if token is None:
        return {"statusCode": 401, "headers": headers, "body": json.dumps({"output": "Not Authorized"})}
    role = _role_for(token)
    if role is None:
        headers["Cache-control"] = "no-cache"
        return {"statusCode": 404, "headers": headers, "body": json.dumps({"output": "Not Found"})}
    sts = boto3.client("sts")
    credentials = sts.assume_role(RoleArn=role, DurationSeconds=_DURATION, RoleSessionName=token)["Credentials"]
    expiration = credentials["Expiration"]
    max_age = int(expiration.timestamp() - time.time()) - 300
    headers["Cache-control"] = f"max-age={max_age}" if max_age > 0 else "no-cache"
    body = {
        "AccessKeyId": credentials["AccessKeyId"],
        "SecretAccessKey": credentials["SecretAccessKey"],
        "Token": credentials["SessionToken"],
        "Expiration": expiration.isoformat(),
    }
    return {"statusCode": 200, "headers": headers, "body": json.dumps(body)}


def _handler():
    source = os.getenv("ORIGINAL_SRC")
    if not source:
        return reproduced_handler, "reproduction (scripts/original_broker.py)"
    sys.path.insert(0, source)
    import index  # the original's Lambda entry point

    return index.handler, f"original source ({source})"


def setup(table, token, role):
    dynamodb = boto3.client("dynamodb")
    try:
        dynamodb.create_table(
            TableName=table,
            KeySchema=[{"AttributeName": "auth_token", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "auth_token", "AttributeType": "S"}],
            BillingMode="PAY_PER_REQUEST",
        )
    except dynamodb.exceptions.ResourceInUseException:
        pass
    dynamodb.put_item(TableName=table, Item={"auth_token": {"S": token}, "role_arn": {"S": role}})


def run(token, requests):
    handler, subject = _handler()
    event = {"httpMethod": "GET", "path": "/", "headers": {"Authorization": token}}
    answer = handler(event, None)
    print(f"FIRST {answer['statusCode']}", flush=True)
    if answer["statusCode"] != 200:
        sys.exit(f"the original answered {answer['statusCode']}: {answer.get('body')}")
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(requests):
        answer = handler(event, None)
        if answer["statusCode"] != 200:
            sys.exit(f"the original answered {answer['statusCode']}: {answer.get('body')}")
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    print(
        json.dumps(
            {
                "subject": subject,
                "requests": requests,
                "cpu_ms_per_request": cpu * 1000 / max(requests, 1),
                "wall_ms_per_request": wall * 1000 / max(requests, 1),
                # Linux reports ru_maxrss in KiB.
                "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "setup":
        setup(*sys.argv[2:])
    elif len(sys.argv) == 4 and sys.argv[1] == "run":
        run(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit(__doc__)
