"""A small client of the Kubernetes API stand-in for scripts/run-local.sh: the server, CA and
bearer token of the kubeconfig it writes, and JSON requests with them (standard library only;
run-local.sh must work before any venv exists)."""

import base64
import json
import ssl
import urllib.request


class Api:
    """The API server a stand-in kubeconfig points at."""

    def __init__(self, kubeconfig_path):
        text = open(kubeconfig_path).read()

        def field(key):
            return text.split(key + ":", 1)[1].split("\n", 1)[0].strip().strip('"')

        self.server = field("server")
        self.token = field("token")
        ca = base64.b64decode(field("certificate-authority-data")).decode()
        self.context = ssl.create_default_context(cadata=ca)

    def request(self, method, path, body=None):
        """`method path` with a JSON body (if any); the JSON answer."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            f"{self.server}{path}",
            method=method,
            data=data,
            headers={"Authorization": "Bearer " + self.token, "Content-Type": "application/json"},
        )
        return json.load(urllib.request.urlopen(req, context=self.context))


def admission_patch(answer_path):
    """The AdmissionReview `response` in `answer_path` and its decoded JSON patch."""
    answer = json.load(open(answer_path))["response"]
    assert answer.get("patch"), f"no patch: {answer}"
    return answer, json.loads(base64.b64decode(answer["patch"]))

