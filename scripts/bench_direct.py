#!/usr/bin/env python3
"""Direct mode next to sidecar mode, measured with the real SDKs (run by scripts/bench-direct.sh,
which starts moto, mints a Secret-mode token and makes the TLS certificates).

For each SDK - botocore (what the AWS CLI and boto3 use), the AWS SDK for Rust (sdk-whoami) and
the AWS SDK for JavaScript v3 (tests/js/whoami.mjs) - and each way of reaching the broker:

- direct, broker cache warm: the SDK calls `iam-broker serve --tls` itself; the pod's
  credentials are in the broker's cache (the common case: another process of the pod fetched
  in the last 40 minutes);
- direct, broker cache miss: the same against a broker with CREDENTIAL_CACHE_MAX_ENTRIES=0, so
  every fetch is an AssumeRole (moto's: a local STS, far faster than the real one);
- direct, cold broker: a broker process started just before (its first request: SDK clients,
  the first DynamoDB and STS connections) - the closest local stand-in for a Lambda cold
  start, without Lambda's own init;
- sidecar, warm: the SDK calls the sidecar on loopback, which has the credentials cached;
- sidecar, cold: a sidecar started just before (a new pod), in front of the warm broker;

the time from starting the SDK's process to its first credentials (each consumer reports the
wall-clock instant it got them; the harness notes when it started the process), median of RUNS
runs, and each SDK's own container-fetch timeout for scale. Then the sidecar's memory (VmRSS and
VmHWM after the runs), which direct mode does not spend.
"""

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import urllib.request
import ssl

BOTO = r"""
import time
from botocore.credentials import ContainerProvider
ContainerProvider().load().get_frozen_credentials()
import sys
sys.stderr.write(f"first credentials at {time.time() * 1000:.1f} ms since the epoch\n")
"""

# Each SDK's own container-credentials fetch timeout (and retries), from its source
# (README, "Direct mode").
TIMEOUTS = {
    "botocore": "2 s, 3 attempts",
    "Rust SDK": "connect 2 s / read 5 s, 3 attempts",
    "JavaScript SDK v3": "1 s, 4 attempts",
}


def consumers(args):
    return [
        ("botocore", [args.python, "-c", BOTO]),
        ("Rust SDK", [args.sdk_whoami]),
        ("JavaScript SDK v3", ["node", args.js_whoami]),
    ]


def first_credentials(argv, env):
    """ms from starting the process to its first credentials (the process says when)."""
    started = time.time() * 1000
    out = subprocess.run(argv, env={**env, "IAMB_TIMING": "1"}, capture_output=True, text=True,
                         timeout=60)
    match = re.search(r"first credentials (?:after [0-9.]+ ms, )?at ([0-9.]+) ms since the epoch",
                      out.stderr)
    if out.returncode != 0 or not match:
        sys.exit(f"{argv[0]} failed ({out.returncode}):\n{out.stderr}")
    return float(match.group(1)) - started


def wait_http(url, context=None, seconds=30):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, context=context, timeout=1)
            return
        except Exception:
            time.sleep(0.05)
    sys.exit(f"{url} did not answer")


class Bench:
    def __init__(self, args):
        self.args = args
        self.ca_context = ssl.create_default_context(cafile=args.ca)
        self.procs = []

    def serve(self, cache_entries):
        port = free_port()
        log = open(os.path.join(self.args.work, f"serve-{port}.log"), "w")
        env = {**os.environ, "CREDENTIAL_CACHE_MAX_ENTRIES": str(cache_entries), "RUST_LOG": "info"}
        proc = subprocess.Popen([self.args.iam_broker, "serve", "--listen", f"127.0.0.1:{port}",
                                 "--tls-cert", self.args.cert, "--tls-key", self.args.key],
                                env=env, stdout=log, stderr=log)
        self.procs.append(proc)
        url = f"https://127.0.0.1:{port}/"
        wait_http(url + "healthz", self.ca_context)
        return proc, url

    def sidecar(self, broker):
        port = free_port()
        log = open(os.path.join(self.args.work, f"proxy-{port}.log"), "w")
        with open(self.args.ca) as f:
            ca_pem = f.read()
        env = {"PATH": os.environ["PATH"], "BROKER_URL": broker, "BROKER_CA_PEM": ca_pem,
               "LISTEN_ADDR": f"127.0.0.1:{port}", "RUST_LOG": "warn"}
        proc = subprocess.Popen([self.args.proxy], env=env, stdout=log, stderr=log)
        self.procs.append(proc)
        url = f"http://127.0.0.1:{port}/"
        wait_http(url + "healthz")
        return proc, url

    def pod_env(self, uri):
        env = {
            "PATH": os.environ["PATH"],
            "HOME": os.environ.get("HOME", "/tmp"),
            "AWS_CONTAINER_CREDENTIALS_FULL_URI": uri,
            "AWS_CONTAINER_AUTHORIZATION_TOKEN": self.args.token,
            "AWS_ENDPOINT_URL": os.environ["AWS_ENDPOINT_URL"],
            "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
            "AWS_EC2_METADATA_DISABLED": "true",
            # How a pod image trusts a private CA for the broker (README, "Direct mode").
            "SSL_CERT_FILE": self.args.ca,
            "NODE_EXTRA_CA_CERTS": self.args.ca,
            "PYTHONPATH": self.args.certifi_path,
        }
        return env

    def measure(self, runs):
        rows = []
        warm_proc, warm = self.serve(10_000)
        _, nocache = self.serve(0)
        sidecar_proc, sidecar = self.sidecar(warm)
        for name, argv in consumers(self.args):
            first_credentials(argv, self.pod_env(warm))  # the pod's first fetch fills the cache
            first_credentials(argv, self.pod_env(sidecar))
            figures = {
                "direct, broker cache warm": [first_credentials(argv, self.pod_env(warm))
                                              for _ in range(runs)],
                "direct, broker cache miss (AssumeRole)": [
                    first_credentials(argv, self.pod_env(nocache)) for _ in range(runs)],
                "sidecar, warm": [first_credentials(argv, self.pod_env(sidecar))
                                  for _ in range(runs)],
            }
            cold, fresh_sidecar = [], []
            for _ in range(runs):
                proc, url = self.serve(10_000)
                cold.append(first_credentials(argv, self.pod_env(url)))
                proc.terminate()
                proc.wait()
                proc, url = self.sidecar(warm)
                fresh_sidecar.append(first_credentials(argv, self.pod_env(url)))
                proc.terminate()
                proc.wait()
            figures["direct, cold broker (its first request)"] = cold
            figures["sidecar, cold (a new pod's sidecar)"] = fresh_sidecar
            rows.append((name, figures))
        status = open(f"/proc/{sidecar_proc.pid}/status").read()
        memory = {k: re.search(rf"^{k}:\s+(\d+) kB", status, re.M).group(1)
                  for k in ("VmRSS", "VmHWM")}
        served = sum(open(os.path.join(self.args.work, f)).read().count('"cache":"hit"')
                     for f in os.listdir(self.args.work) if f.startswith("serve-"))
        return rows, memory, served

    def stop(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait()


def free_port():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("work", "iam-broker", "proxy", "sdk-whoami", "js-whoami", "python", "ca",
                 "cert", "key", "token", "certifi-path"):
        parser.add_argument(f"--{name}", required=True)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    bench = Bench(args)
    try:
        rows, memory, hits = bench.measure(args.runs)
    finally:
        bench.stop()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    print(f"Machine: {os.cpu_count()} vCPU ({cpu}), load average "
          f"{os.getloadavg()[0]:.1f} at the end; {args.runs} runs per cell; "
          f"`iam-broker serve --tls`, the sidecar and sdk-whoami in release builds; moto for "
          f"DynamoDB and STS.\n")
    configs = list(rows[0][1])
    print("Process start to first credentials, median (min-max), ms:\n")
    print("| way to the broker | " + " | ".join(name for name, _ in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for config in configs:
        cells = []
        for _, figures in rows:
            values = figures[config]
            cells.append(f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})")
        print(f"| {config} | " + " | ".join(cells) + " |")
    print("| the SDK's own fetch timeout | " + " | ".join(TIMEOUTS[name] for name, _ in rows)
          + " |")
    print(f"\nSidecar memory after {len(rows) * (2 * args.runs + 1)} fetches: "
          f"VmRSS {int(memory['VmRSS']) / 1024:.1f} MiB, VmHWM {int(memory['VmHWM']) / 1024:.1f} MiB "
          f"(direct mode: no process). Broker cache hits logged: {hits}.")


if __name__ == "__main__":
    main()
