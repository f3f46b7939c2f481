"""Side by side with the original broker: start -> first credential, CPU per credential request
and peak RSS, in one run against one moto. Driven by scripts/bench-original.sh, which builds the
binaries, starts moto, creates the tables and tokens and sets the environment; see there.

Subjects:
- original: scripts/original_broker.py (or the original's own code, ORIGINAL_SRC) in-process;
- iam-broker serve: the release binary behind its HTTP server, a keep-alive client;
- bootstrap: the release Lambda binary under a local Lambda Runtime API (the same HTTP protocol
  the Lambda service speaks), each invocation an API Gateway GET event.

Start -> first credential runs from spawning the process to the first 200 answer with
credentials, RUNS times (median, min, max). CPU per request is the process's user + system time
over REQUESTS warm requests made one after the other (as the original's in-process loop makes
them), read from /proc; peak RSS is VmHWM (the original's ru_maxrss).
"""

import http.client
import http.server
import json
import os
import queue
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid

RUNS = int(os.environ.get("RUNS", "5"))
REQUESTS = int(os.environ.get("REQUESTS", "300"))
TICK = os.sysconf("SC_CLK_TCK")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def peak_rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmHWM for {pid}")


def stop(process):
    process.kill()
    process.wait()


# --- the original ---------------------------------------------------------------------------


def original(requests):
    """Spawns the original, returns (seconds to its first credential, figures or None)."""
    command = [os.environ["ORIGINAL_PYTHON"], os.environ["ORIGINAL_SCRIPT"], "run",
               os.environ["ORIGINAL_TOKEN"], str(requests)]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    first = process.stdout.readline()
    elapsed = time.perf_counter() - started
    if first.strip() != "FIRST 200":
        sys.exit(f"the original did not serve a credential: {first!r}")
    rest = process.stdout.read()
    if process.wait() != 0:
        sys.exit("the original failed")
    return elapsed, (json.loads(rest) if requests else None)


# --- iam-broker serve -----------------------------------------------------------------------


def get(connection, token):
    connection.request("GET", "/", headers={"Authorization": token})
    response = connection.getresponse()
    body = response.read()
    return response.status, body


def first_answer(process, port, pause):
    """Polls until `serve` answers (connection, status, body); exits if it stops or takes 30 s."""
    deadline = time.perf_counter() + 30
    while time.perf_counter() < deadline:
        if process.poll() is not None:
            sys.exit(f"iam-broker serve exited with {process.returncode} before answering")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            status, body = get(connection, os.environ["BROKER_TOKEN"])
            return connection, status, body
        except ConnectionRefusedError:
            time.sleep(pause)
    sys.exit("iam-broker serve did not answer within 30 s")


def serve_process(port):
    command = [os.environ["IAM_BROKER"], "serve", "--listen", f"127.0.0.1:{port}"]
    return subprocess.Popen(command, stderr=subprocess.DEVNULL, env={**os.environ, "RUST_LOG": "warn"})


def serve_first():
    port = free_port()
    started = time.perf_counter()
    process = serve_process(port)
    try:
        connection, status, body = first_answer(process, port, pause=0.0005)
        elapsed = time.perf_counter() - started
        if status != 200 or b"AccessKeyId" not in body:
            sys.exit(f"iam-broker serve answered {status}: {body[:200]!r}")
        return elapsed
    finally:
        stop(process)


def serve_warm(requests):
    port = free_port()
    process = serve_process(port)
    try:
        connection, _, _ = first_answer(process, port, pause=0.005)
        cpu, wall = cpu_seconds(process.pid), time.perf_counter()
        for _ in range(requests):
            status, body = get(connection, os.environ["BROKER_TOKEN"])
            if status != 200:
                sys.exit(f"iam-broker serve answered {status}: {body[:200]!r}")
        cpu, wall = cpu_seconds(process.pid) - cpu, time.perf_counter() - wall
        return {"cpu_ms_per_request": cpu * 1000 / requests, "wall_ms_per_request": wall * 1000 / requests,
                "peak_rss_kib": peak_rss_kib(process.pid)}
    finally:
        stop(process)


# --- bootstrap under a local Lambda Runtime API ---------------------------------------------


class RuntimeApi:
    """The Lambda Runtime API's invocation loop (next, response, error), on 127.0.0.1."""

    def __init__(self, events):
        self.pending = queue.Queue()
        for event in events:
            self.pending.put(event)
        self.answers = queue.Queue()
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_):
                pass

            def reply(self, status, body, headers=()):
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path != "/2018-06-01/runtime/invocation/next":
                    return self.reply(404, b"{}")
                event = api.pending.get()
                self.reply(200, json.dumps(event).encode(), [
                    ("Lambda-Runtime-Aws-Request-Id", str(uuid.uuid4())),
                    ("Lambda-Runtime-Deadline-Ms", str(int(time.time() * 1000) + 30000)),
                    ("Lambda-Runtime-Invoked-Function-Arn",
                     "arn:aws:lambda:us-east-1:123456789012:function:iam-broker"),
                    ("Lambda-Runtime-Trace-Id", "Root=1-00000000-000000000000000000000000"),
                ])

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                self.reply(202, b"{}")
                api.answers.put((time.perf_counter(), self.path, body))

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass  # a bootstrap stopped while waiting for its next event: expected

        self.server = Server(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def address(self):
        return f"127.0.0.1:{self.server.server_address[1]}"

    def answer(self):
        try:
            at, path, body = self.answers.get(timeout=30)
        except queue.Empty:
            sys.exit("bootstrap answered no invocation within 30 s (does it start? run it by hand)")
        if not path.endswith("/response"):
            sys.exit(f"bootstrap reported an error at {path}: {body[:300]!r}")
        answer = json.loads(body)
        if answer.get("statusCode") != 200 or "AccessKeyId" not in answer.get("body", ""):
            sys.exit(f"bootstrap answered {answer.get('statusCode')}: {str(answer)[:300]}")
        return at

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def lambda_event():
    with open(os.environ["BROKER_EVENT"]) as f:
        event = json.load(f)
    header = f"Bearer {os.environ['BROKER_TOKEN']}"
    event["headers"]["Authorization"] = header
    event["multiValueHeaders"]["Authorization"] = [header]
    return event


def bootstrap_process(api):
    environment = {
        **os.environ,
        "AWS_LAMBDA_RUNTIME_API": api.address,
        "_HANDLER": "http",
        "AWS_LAMBDA_HTTP_IGNORE_STAGE_IN_PATH": "true",
        "AWS_LAMBDA_FUNCTION_NAME": "iam-broker",
        "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "256",
        "AWS_LAMBDA_LOG_GROUP_NAME": "/aws/lambda/iam-broker",
        "AWS_LAMBDA_LOG_STREAM_NAME": "bench",
        "RUST_LOG": "warn",
    }
    return subprocess.Popen([os.environ["BOOTSTRAP"]], env=environment,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def bootstrap_first():
    api = RuntimeApi([lambda_event()])
    started = time.perf_counter()
    process = bootstrap_process(api)
    try:
        return api.answer() - started
    finally:
        stop(process)
        api.close()


def bootstrap_warm(requests):
    event = lambda_event()
    api = RuntimeApi([event] * (requests + 1))
    process = bootstrap_process(api)
    try:
        api.answer()
        cpu, wall = cpu_seconds(process.pid), time.perf_counter()
        for _ in range(requests):
            last = api.answer()
        cpu, wall = cpu_seconds(process.pid) - cpu, last - wall
        return {"cpu_ms_per_request": cpu * 1000 / requests, "wall_ms_per_request": wall * 1000 / requests,
                "peak_rss_kib": peak_rss_kib(process.pid)}
    finally:
        stop(process)
        api.close()


# --- report ---------------------------------------------------------------------------------


def spread(samples):
    ms = sorted(s * 1000 for s in samples)
    return statistics.median(ms), ms[0], ms[-1]


def variants():
    """VARIANTS="name=bindir ...": iam-broker serve and bootstrap of each release-profile variant
    (scripts/bench-profiles.sh), interleaved, with their artifact sizes."""
    import zipfile
    import io
    builds = [item.split("=", 1) for item in os.environ["VARIANTS"].split()]
    starts = {name: {"serve": [], "bootstrap": []} for name, _ in builds}
    for _ in range(RUNS):
        for name, directory in builds:
            os.environ["IAM_BROKER"] = f"{directory}/iam-broker"
            os.environ["BOOTSTRAP"] = f"{directory}/bootstrap"
            starts[name]["serve"].append(serve_first())
            starts[name]["bootstrap"].append(bootstrap_first())
    print(f"\n{RUNS} starts each, {REQUESTS} warm requests each, one after the other\n")
    print("| variant | bootstrap | zipped | start -> first credential: serve / bootstrap (median) "
          "| CPU per request: serve / bootstrap | peak RSS: serve / bootstrap |")
    print("|---|---|---|---|---|---|")
    for name, directory in builds:
        os.environ["IAM_BROKER"] = f"{directory}/iam-broker"
        os.environ["BOOTSTRAP"] = f"{directory}/bootstrap"
        serve, bootstrap = serve_warm(REQUESTS), bootstrap_warm(REQUESTS)
        size = os.path.getsize(f"{directory}/bootstrap")
        archive = io.BytesIO()
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
            z.write(f"{directory}/bootstrap", "bootstrap")
        print(f"| {name} | {size / 2**20:.1f} MiB | {len(archive.getvalue()) / 2**20:.1f} MiB "
              f"| {spread(starts[name]['serve'])[0]:.1f} / {spread(starts[name]['bootstrap'])[0]:.1f} ms "
              f"| {serve['cpu_ms_per_request']:.3f} / {bootstrap['cpu_ms_per_request']:.3f} ms "
              f"| {serve['peak_rss_kib'] / 1024:.1f} / {bootstrap['peak_rss_kib'] / 1024:.1f} MiB |")


def main():
    if os.environ.get("VARIANTS"):
        return variants()
    starts = {"original": [], "serve": [], "bootstrap": []}
    for _ in range(RUNS):  # interleaved, so a slow moment hits every subject alike
        starts["original"].append(original(0)[0])
        starts["serve"].append(serve_first())
        starts["bootstrap"].append(bootstrap_first())
    _, theirs = original(REQUESTS)
    warm = {"original": theirs, "serve": serve_warm(REQUESTS), "bootstrap": bootstrap_warm(REQUESTS)}

    names = {"original": f"original, {theirs['subject']}", "serve": "iam-broker serve",
             "bootstrap": "bootstrap (Lambda Runtime API)"}
    print(f"\n{RUNS} starts each, {REQUESTS} warm requests each, one after the other\n")
    print("| subject | start -> first credential, median (min-max) | CPU per request | wall per request | peak RSS |")
    print("|---|---|---|---|---|")
    for key in ("original", "serve", "bootstrap"):
        median, low, high = spread(starts[key])
        figures = warm[key]
        print(f"| {names[key]} | {median:.1f} ms ({low:.1f}-{high:.1f}) | {figures['cpu_ms_per_request']:.3f} ms "
              f"| {figures['wall_ms_per_request']:.2f} ms | {figures['peak_rss_kib'] / 1024:.1f} MiB |")
    print("\n| ratio to the original (higher is better) | start -> first credential | CPU per request | peak RSS |")
    print("|---|---|---|---|")
    base_start = spread(starts["original"])[0]
    for key in ("serve", "bootstrap"):
        figures = warm[key]
        print(f"| {names[key]} | {base_start / spread(starts[key])[0]:.1f}x "
              f"| {theirs['cpu_ms_per_request'] / figures['cpu_ms_per_request']:.1f}x "
              f"| {theirs['peak_rss_kib'] / figures['peak_rss_kib']:.1f}x |")
    print("\ngoals (issue 12): start >= 20x, CPU per request >= 50x, peak RSS >= 5x (<= 16 MiB)")


if __name__ == "__main__":
    main()
