"""AWS Lambda and API Gateway, as far as the rehearsal needs them.

- `Function` runs the real `bootstrap` binary under the Lambda Runtime API
  (https://docs.aws.amazon.com/lambda/latest/dg/runtimes-api.html): the binary polls
  `/2018-06-01/runtime/invocation/next` and posts its answer, as on AWS. Its environment is built
  from scratch, like Lambda's: the function's `Environment.Variables`, the reserved `AWS_*`
  variables, and the execution role's session credentials. Nothing of the rehearsal's own
  environment leaks in.
- `RestApi` is API Gateway's REST proxy integration: it routes by the expanded template's
  swagger `paths` (method + path template), strips the stage, builds the REST v1 event, invokes
  the function and turns its answer back into HTTP. Unknown routes get API Gateway's own 403
  `Missing Authentication Token`. It answers on two listeners on 127.0.0.1, the same routes on
  each: plain http (`local_url`), where the rehearsal itself and the sidecar call it, and TLS
  (`local_tls_url`), where an SDK that calls the stack's https URL itself (direct injection)
  does. The TLS listener's certificate, for `127.0.0.1`, is signed by a private CA made at start
  (`tls_ca_pem`): trusting that CA, and mapping `https://<api>.execute-api.<region>.amazonaws.com`
  to `https://127.0.0.1:<port>`, is the rehearsal's stand-in for DNS and API Gateway's public
  certificate. An SDK that does not trust the CA is refused at the handshake, as it would be by
  a broker whose certificate it cannot verify.
"""

import base64
import datetime
import http.client
import ipaddress
import json
import os
import queue
import re
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

RUNTIME = "/2018-06-01/runtime"


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # a client that hung up (the sidecar stopped, a timed-out SDK) or refused the TLS
        # listener's certificate is not the rehearsal's concern; anything else is printed as usual
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError, ssl.SSLError)):
            return
        super().handle_error(request, client_address)


class _TlsServer(_Server):
    """`_Server` over TLS: the listening socket is wrapped server-side; each connection's
    handshake runs on its own thread (in `finish_request`), so a client that stalls or refuses
    the certificate holds up no other."""

    def __init__(self, address, handler, context):
        super().__init__(address, handler)
        self.socket = context.wrap_socket(self.socket, server_side=True,
                                          do_handshake_on_connect=False)

    def finish_request(self, request, client_address):
        request.settimeout(30)
        request.do_handshake()
        super().finish_request(request, client_address)


def _private_ca(host):
    """A CA made for this run and a server certificate for `host` (an IP address) it signed:
    (CA PEM, certificate PEM, key PEM)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "iam-broker rehearsal CA")])
    ca = (x509.CertificateBuilder()
          .subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, key_cert_sign=True, crl_sign=True,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(host))]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    return (ca.public_bytes(pem).decode(), leaf.public_bytes(pem).decode(),
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()).decode())


def _server_context(certificate_pem, key_pem):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # load_cert_chain reads files only: they live as long as this call
    with tempfile.TemporaryDirectory(prefix="rehearsal-tls-") as folder:
        certificate, key = os.path.join(folder, "tls.crt"), os.path.join(folder, "tls.key")
        with open(certificate, "w") as f:
            f.write(certificate_pem)
        with open(key, "w", opener=lambda path, flags: os.open(path, flags, 0o600)) as f:
            f.write(key_pem)
        context.load_cert_chain(certificate, key)
    return context


class InvocationError(Exception):
    pass


class Function:
    def __init__(self, name, binary, environment, timeout_seconds, log_path):
        self.name = name
        self.binary = binary
        self.environment = environment
        self.timeout = timeout_seconds
        self.log_path = log_path
        self._pending = queue.Queue()
        self._results = {}
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), self._handler())
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.runtime_api = f"127.0.0.1:{self._server.server_address[1]}"
        self._process = None
        self.init_error = None

    def start(self):
        env = dict(self.environment)
        env["AWS_LAMBDA_RUNTIME_API"] = self.runtime_api
        self._log = open(self.log_path, "ab")
        self._process = subprocess.Popen([self.binary], env=env, stdout=self._log, stderr=self._log)

    def stop(self):
        if self._process and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
        self._server.shutdown()

    def invoke(self, event):
        """Runs one invocation; returns the function's JSON answer or raises InvocationError."""
        if self._process is None or self._process.poll() is not None:
            raise InvocationError(f"{self.name} is not running (init error: {self.init_error})")
        request_id = str(uuid.uuid4())
        done = threading.Event()
        with self._lock:
            self._results[request_id] = (done, None)
        self._pending.put((request_id, json.dumps(event).encode()))
        if not done.wait(self.timeout):
            raise InvocationError(f"{self.name}: Task timed out after {self.timeout} seconds")
        with self._lock:
            _, (kind, body) = self._results.pop(request_id)
        if kind == "error":
            raise InvocationError(f"{self.name}: {body.decode(errors='replace')}")
        return json.loads(body)

    def _finish(self, request_id, kind, body):
        with self._lock:
            entry = self._results.get(request_id)
            if entry is None:
                return False
            self._results[request_id] = (entry[0], (kind, body))
            entry[0].set()
            return True

    def _handler(self):
        function = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _reply(self, status, body=b"{}", headers=()):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for key, value in headers:
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path != f"{RUNTIME}/invocation/next":
                    return self._reply(404)
                request_id, event = function._pending.get()
                deadline = int((time.time() + function.timeout) * 1000)
                self._reply(200, event, [
                    ("Lambda-Runtime-Aws-Request-Id", request_id),
                    ("Lambda-Runtime-Deadline-Ms", str(deadline)),
                    ("Lambda-Runtime-Invoked-Function-Arn",
                     f"arn:aws:lambda:us-east-1:123456789012:function:{function.name}"),
                    ("Lambda-Runtime-Trace-Id", f"Root=1-{uuid.uuid4().hex[:8]}-{uuid.uuid4().hex[:24]}"),
                ])

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                match = re.fullmatch(rf"{RUNTIME}/invocation/([^/]+)/(response|error)", self.path)
                if match:
                    ok = function._finish(match.group(1), match.group(2), body)
                    return self._reply(202 if ok else 400)
                if self.path == f"{RUNTIME}/init/error":
                    function.init_error = body.decode(errors="replace")
                    return self._reply(202)
                return self._reply(404)

        return Handler


class RestApi:
    """One REST API with one stage, proxying each route to a Function."""

    def __init__(self, api_id, stage, region, routes):
        # routes: list of (METHOD, "/path/{param}", Function)
        self.api_id = api_id
        self.stage = stage
        self.domain = f"{api_id}.execute-api.{region}.amazonaws.com"
        self.routes = [(m.upper(), p, self._pattern(p), f) for m, p, f in routes]
        self.calls = []
        self._server = _Server(("127.0.0.1", 0), self._handler())
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.local_origin = f"http://127.0.0.1:{self._server.server_address[1]}"
        # the same routes over TLS, with a certificate for 127.0.0.1 from a CA made for this run
        self.tls_ca_pem, certificate, key = _private_ca("127.0.0.1")
        self._tls_server = _TlsServer(("127.0.0.1", 0), self._handler(),
                                      _server_context(certificate, key))
        threading.Thread(target=self._tls_server.serve_forever, daemon=True).start()
        self.local_tls_origin = f"https://127.0.0.1:{self._tls_server.server_address[1]}"

    @property
    def public_origin(self):
        return f"https://{self.domain}"

    def local_url(self, public_url):
        """The rehearsal's stand-in for DNS + TLS: the stack's https URL → this emulator."""
        return self.local_origin + self._path_of(public_url)

    def local_tls_url(self, public_url):
        """The rehearsal's stand-in for DNS + a public certificate: the stack's https URL → this
        emulator's TLS listener (`https://127.0.0.1:<port>/...`), which a client reaches only
        when it trusts `tls_ca_pem`."""
        return self.local_tls_origin + self._path_of(public_url)

    def _path_of(self, public_url):
        if not public_url.startswith(self.public_origin):
            raise ValueError(f"{public_url} is not on {self.public_origin}")
        return public_url[len(self.public_origin):]

    def stop(self):
        self._server.shutdown()
        self._tls_server.shutdown()

    @staticmethod
    def _pattern(path):
        return re.compile("^" + re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(path)) + "$")

    def _route(self, method, path):
        for m, template, pattern, function in self.routes:
            match = pattern.match(path)
            if match and m in (method, "ANY"):
                return template, match.groupdict() or None, function
        return None

    def _event(self, method, path, query, headers, body, template, parameters):
        single = {}
        multi = {}
        for key, value in headers:
            single[key] = value
            multi.setdefault(key, []).append(value)
        single["Host"] = multi["Host"] = self.domain
        multi["Host"] = [self.domain]
        single["X-Forwarded-Proto"] = "https"
        multi["X-Forwarded-Proto"] = ["https"]
        text = body.decode("utf-8") if body else None
        return {
            "resource": template,
            "path": path,
            "httpMethod": method,
            "headers": single,
            "multiValueHeaders": multi,
            "queryStringParameters": dict(query) or None,
            "multiValueQueryStringParameters": {k: [v] for k, v in query} or None,
            "pathParameters": parameters,
            "stageVariables": None,
            "requestContext": {
                "accountId": "123456789012",
                "apiId": self.api_id,
                "resourcePath": template,
                "httpMethod": method,
                "path": f"/{self.stage}{path}",
                "protocol": "HTTP/1.1",
                "stage": self.stage,
                "requestId": str(uuid.uuid4()),
                "requestTimeEpoch": int(time.time() * 1000),
                "identity": {"sourceIp": "127.0.0.1", "userAgent": single.get("User-Agent", "")},
                "domainName": self.domain,
            },
            "body": text,
            "isBase64Encoded": False,
        }

    def _handler(self):
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _reply(self, status, headers, body):
                self.send_response(status)
                for key, value in headers:
                    if key.lower() not in ("content-length", "connection", "transfer-encoding"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _any(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                raw_path, _, raw_query = self.path.partition("?")
                # API Gateway hands the function the query string decoded
                query = [tuple(urllib.parse.unquote(x) for x in p.split("=", 1))
                         for p in raw_query.split("&") if "=" in p]
                prefix = f"/{api.stage}"
                if not (raw_path == prefix or raw_path.startswith(prefix + "/")):
                    return self._reply(403, [("Content-Type", "application/json")],
                                       b'{"message":"Forbidden"}')
                path = raw_path[len(prefix):] or "/"
                route = api._route(self.command, path)
                api.calls.append((self.command, path, route[0] if route else None))
                if route is None:
                    return self._reply(403, [("Content-Type", "application/json")],
                                       b'{"message":"Missing Authentication Token"}')
                template, parameters, function = route
                event = api._event(self.command, path, query, self.headers.items(), body,
                                   template, parameters)
                try:
                    answer = function.invoke(event)
                except InvocationError:
                    return self._reply(502, [("Content-Type", "application/json")],
                                       b'{"message": "Internal server error"}')
                headers = []
                for key, values in (answer.get("multiValueHeaders") or {}).items():
                    headers += [(key, v) for v in values]
                seen = {k.lower() for k, _ in headers}
                for key, value in (answer.get("headers") or {}).items():
                    if key.lower() not in seen:
                        headers.append((key, value))
                payload = answer.get("body") or ""
                data = base64.b64decode(payload) if answer.get("isBase64Encoded") else payload.encode()
                self._reply(int(answer.get("statusCode", 502)), headers, data)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _any

        return Handler


def http_request(method, url, body=None, headers=None, timeout=30):
    """A plain HTTP call; returns (status, headers dict, body bytes)."""
    match = re.fullmatch(r"http://([^/]+)(/.*)?", url)
    if not match:
        raise ValueError(f"not a local http URL: {url}")
    connection = http.client.HTTPConnection(match.group(1), timeout=timeout)
    try:
        connection.request(method, match.group(2) or "/", body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()
