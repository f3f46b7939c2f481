#!/usr/bin/env python3
"""moto server with IAM enforcement that also checks resources, for the deploy rehearsal.

    moto-iam-server.py -H 127.0.0.1 -p PORT        (the same arguments as moto_server)

Run it with INITIAL_NO_AUTH_ACTION_COUNT set: after that many unauthenticated calls, moto checks
every request's signature and evaluates the caller's IAM policies. Out of the box moto 5 does
that with the request's resource set to "*" for DynamoDB and SSM, so a statement scoped to a
table or parameter ARN (as template.yaml's are) never matches, and it compares a trust policy's
principal with the caller's session ARN literally. This wrapper closes those gaps the way AWS
behaves, and nothing else:

1. DynamoDB requests are authorized against the table's ARN
   (arn:aws:dynamodb:REGION:ACCOUNT:table/NAME), whichever table and call it is (GetItem,
   UpdateItem, PutItem, DeleteItem, Scan on the Allowances, Authorizations and Clusters tables
   alike: a policy scoped to one table grants nothing on another), SSM parameter requests against the parameter's
   ARN (arn:aws:ssm:REGION:ACCOUNT:parameter/NAME). STS AssumeRole already uses the role ARN.
2. A trust policy that names a role ARN as its AWS principal trusts the sessions of that role
   (arn:aws:sts::ACCOUNT:assumed-role/NAME/SESSION), as IAM documents.
3. A trust policy that names a service principal (lambda.amazonaws.com) trusts the IAM user
   user/service-principal/<that service>: the rehearsal signs as that user where AWS Lambda
   itself would assume the function's role.
"""

import re
import sys

from moto import server
from moto.dynamodb.responses import DynamoHandler
from moto.iam import access_control
from moto.ssm.responses import SimpleSystemManagerResponse


def _dynamodb_resource(self):
    body = self.body if isinstance(self.body, dict) else {}
    table = body.get("TableName")
    if not table and isinstance(body.get("RequestItems"), dict) and len(body["RequestItems"]) == 1:
        # BatchGetItem / BatchWriteItem of one table: authorized against that table, as IAM does
        # (a batch over several tables would need each; iam-broker never sends one).
        table = next(iter(body["RequestItems"]))
    if not table:
        return "*"
    return f"arn:aws:dynamodb:{self.region}:{self.current_account}:table/{table}"


def _ssm_resource(self):
    name = self._get_param("Name")
    if not isinstance(name, str) or not name:
        return "*"
    path = name if name.startswith("/") else f"/{name}"
    return f"arn:aws:ssm:{self.region}:{self.current_account}:parameter{path}"


_SESSION = re.compile(r"^arn:(aws[\w-]*):sts::(\d{12}):assumed-role/([^/]+)/[^/]+$")
# moto leaves the path out of a user's ARN; the name alone (a service's DNS name) is unambiguous
_SERVICE_USER = re.compile(r"^arn:aws[\w-]*:iam::\d{12}:user/(?:service-principal/)?([a-z0-9-]+\.amazonaws\.com)$")


def _as_list(value):
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _check_principal(self, principal):
    expected = self._statement.get("Principal")
    if not expected:
        return True
    if expected == "*":
        return True
    aws = _as_list(expected.get("AWS"))
    if "*" in aws or principal in aws:
        return True
    session = _SESSION.match(principal)
    if session:
        partition, account, role = session.groups()
        role_arns = {a for a in aws if re.match(rf"^arn:{partition}:iam::{account}:role/(.*/)?{re.escape(role)}$", a)}
        if role_arns:
            return True
    service_user = _SERVICE_USER.match(principal)
    if service_user and service_user.group(1) in _as_list(expected.get("Service")):
        return True
    return False


DynamoHandler._determine_resource = _dynamodb_resource
SimpleSystemManagerResponse._determine_resource = _ssm_resource
access_control.IAMPolicyStatement._check_principal = _check_principal

if __name__ == "__main__":
    server.main(sys.argv[1:])
