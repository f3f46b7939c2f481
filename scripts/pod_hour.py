#!/usr/bin/env python3
"""STS calls and broker requests per pod-hour in projected mode, sidecar and direct injection,
on a fake clock, with botocore's real refresh code.

One pod, simulated for 24 hours (by default) per CREDENTIAL_DURATION_SECONDS, workload and
injection. What is real and what is a model:

- The SDK is botocore itself: its ``ContainerProvider`` (reads the token file at every fetch and
  sends it as ``Authorization``, as a pod's SDK does) and the ``RefreshableCredentials`` it
  returns (advisory refresh 15 min before expiry, mandatory 10 min before, and its check of a
  refreshed credential), with ``_time_fetcher`` set to the fake clock. Only the HTTP fetch is
  replaced: ``retrieve_full_uri`` asks the sidecar model (``sidecar`` injection) or the broker
  model itself (``direct`` injection: no sidecar, every SDK fetch is a broker request).
- The sidecar's decisions are its own Rust code: ``Policy::decide`` (serve; serve and refresh in
  the background; fetch) and ``Policy::admit`` (reject; serve once, uncached; cache with a
  window), and its defaults, answered by ``crates/proxy/examples/cache-policy.rs`` over a pipe.
  What stays a model is the cache around them (``crates/proxy/src/cache.rs``): keyed by the
  SHA-256 of the ``Authorization`` header as sent, one broker call per miss or background
  refresh, at most ``DEFAULT_CACHE_MAX_ENTRIES`` entries.
- The broker is a model of ``Broker::credentials`` in projected mode: it refuses a token past
  its ``exp`` (plus ``PROJECTED_TOKEN_LEEWAY``), otherwise looks in its credential cache
  (``crates/broker/src/cache.rs``), keyed by the pod's uid, so a rotated token of the same pod
  finds the same entry; the reuse rule, ``Cached::reusable`` (more than
  ``Window::sidecar_default(lifetime).refresh_point()`` left, the lifetime measured when the
  credentials reached the broker), is the Rust code's (the example's ``broker_reusable``). A
  miss is one STS call, kept when reusable on arrival. It answers the ``Cache-Control:
  max-age`` of the Rust ``credentials::cache_max_age``. ``--broker-cache off`` is the broker
  before the cache (one STS call per broker request). The cache is per broker process; the
  model is one warm instance (several Lambda instances or ``serve`` replicas each keep their
  own, so a pod's requests spread over them miss more).
  STS stamps ``Expiration`` in whole seconds. A request sent at ``t`` reaches the broker at
  ``t + latency/4`` (where the cache is consulted), STS stamps at ``t + latency/2``, the
  credentials are back at the broker at ``t + 3 latency/4`` (their lifetime for the cache is
  counted from there) and the answer reaches the sidecar, or the SDK, at ``t + latency``.
- kubelet rewrites the token file when the token is older than 80 % of ``expirationSeconds``
  or 24 h (``pkg/kubelet/token/token_manager.go`` ``requiresRefresh``; its jitter of up to
  10 s and the volume's resync delay are left out, ``--kubelet-lag`` adds a fixed delay).

Workloads (``--workloads``):
- ``service:N``: one long-lived botocore process making an AWS call every N seconds;
- ``workers:K:N``: K long-lived processes (e.g. gunicorn workers) started 7 s apart, each
  making a call every N seconds, sharing the sidecar (or, direct, the broker's cache entry);
- ``cli:N``: a new botocore process (like an ``aws`` CLI command) every N seconds, one call each.

Injections (``--injection``): ``sidecar`` (SDK -> sidecar -> broker) and ``direct`` (SDK ->
broker over https). Broker cache (``--broker-cache``): ``on`` (the broker with its credential
cache) and ``off`` (before it).

Two views of what token rotation costs: a broker call is counted "after a token rotation" when
the sidecar missed for the new token while it still held servable credentials under an earlier
token of the same pod (the call would have been a cache hit but for the rotation; with the
broker cache, such a call is usually a broker-cache hit, not an STS call); and each run is
repeated with a token file that never changes, so "added by rotation" is the difference in STS
calls (a rotation miss can stand in for a refresh that was due anyway).

Run through ``scripts/bench-projected.sh`` (which makes the dev venv); prints Markdown tables: a
summary, sidecar and direct side by side, then every run in detail.
"""

import argparse
import datetime
import hashlib
import heapq
import math
import os
import json
import subprocess
import sys
import tempfile

import botocore
from botocore.credentials import ContainerProvider
from botocore.exceptions import MetadataRetrievalError
from dateutil.tz import tzutc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DAY = 86_400
POD_UID = "sim-pod-uid"  # the simulated pod's uid: every token kubelet writes for it carries it
# Fake epoch: a whole second plus a fraction, so nothing lines up with STS's whole seconds by luck.
T0 = 1_800_000_000.25


class Rust:
    """The Rust code of every decision the models need: the sidecar's ``Policy::admit`` and
    ``Policy::decide``, the broker's ``cache_max_age``, its credential cache's reuse rule and the
    defaults, answered by
    ``crates/proxy/examples/cache-policy.rs`` over a pipe (one JSON line each way), so a change
    of policy or of a default cannot leave this model behind."""

    def __init__(self):
        binary = os.environ.get("CACHE_POLICY_BIN")
        command = [binary] if binary else [
            "cargo", "run", "--quiet", "--locked", "--example", "cache-policy",
        ]
        self.process = subprocess.Popen(
            command, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )

    def ask(self, **request):
        self.process.stdin.write(json.dumps(request) + "\n")
        line = self.process.stdout.readline()
        if not line:
            sys.exit("the cache-policy example stopped; see its output above")
        answer = json.loads(line)
        if "error" in answer:
            sys.exit(f"cache-policy refused {request}: {answer['error']}")
        return answer


RUST = Rust()
_DEFAULTS = RUST.ask(op="defaults")
MIN_VALIDITY = _DEFAULTS["min_validity"]
REFRESH_AHEAD = _DEFAULTS["refresh_ahead"]
CACHE_MAX_ENTRIES = _DEFAULTS["cache_max_entries"]
CACHE_MARGIN = _DEFAULTS["cache_margin"]
LEEWAY = _DEFAULTS["projected_token_leeway"]
TOKEN_EXPIRATION = _DEFAULTS["projected_token_expiration"]
ADVISORY = botocore.credentials._DEFAULT_ADVISORY_REFRESH_TIMEOUT
MANDATORY = botocore.credentials._DEFAULT_MANDATORY_REFRESH_TIMEOUT


class Clock:
    """The fake clock every party reads."""

    def __init__(self):
        self.t = T0

    def now_dt(self):
        return datetime.datetime.fromtimestamp(self.t, tz=tzutc())


def rfc3339(seconds):
    return datetime.datetime.fromtimestamp(seconds, tz=tzutc()).strftime("%Y-%m-%dT%H:%M:%SZ")


class Kubelet:
    """The pod's projected token volume: a file rewritten at 80 % of the token's life or 24 h."""

    def __init__(self, clock, path, expiration_seconds, lag):
        self.clock, self.path = clock, path
        self.expiration_seconds, self.lag = expiration_seconds, lag
        self.tokens = {}  # content -> (iat, exp, pod uid)
        self.rotations = 0
        self.serial = 0
        self.write()

    def write(self):
        self.serial += 1
        iat = self.clock.t
        content = f"sim.projected-token.{self.serial}"
        self.tokens[content] = (iat, iat + self.expiration_seconds, POD_UID)
        with open(self.path, "w", encoding="utf-8") as f:
            f.write(content)
        self.current = content

    def next_rotation(self):
        iat = self.tokens[self.current][0]
        return iat + min(0.8 * self.expiration_seconds, DAY) + self.lag

    def rotate(self):
        self.rotations += 1
        self.write()


class Broker:
    """`Broker::credentials` for a projected token: verify, then the credential cache (keyed by
    the pod's uid) in front of one STS call, and max-age."""

    def __init__(self, clock, kubelet, duration, latency, cache=True):
        self.clock, self.kubelet = clock, kubelet
        self.duration, self.latency = duration, latency
        self.cache = cache
        self.entries = {}  # pod uid -> (body, expiration, issued)
        self.calls = self.sts_calls = self.refused = self.hits = 0

    def reusable(self, entry, now):
        """``Cached::reusable``, by the Rust code."""
        _, expiration, issued = entry
        return RUST.ask(op="broker_reusable", expiration=expiration, issued=issued, now=now)[
            "answer"
        ]

    def call(self, authorization, at):
        """Answers a request sent at `at`: (status, body, expiration, max_age)."""
        self.calls += 1
        token = self.kubelet.tokens.get(authorization)
        if token is None or at > token[1] + LEEWAY:
            self.refused += 1
            return 403, None, None, None
        uid = token[2]
        arrived = at + self.latency / 4
        entry = self.entries.get(uid) if self.cache else None
        if entry is not None and self.reusable(entry, arrived):
            self.hits += 1
            body, expiration, _ = entry
        else:
            self.entries.pop(uid, None)
            self.sts_calls += 1
            expiration = math.floor(at + self.latency / 2) + self.duration
            issued = at + 3 * self.latency / 4
            body = {
                "AccessKeyId": f"ASIASIM{self.sts_calls:09d}",
                "SecretAccessKey": "sim-secret",
                "Token": "sim-session",
                "Expiration": rfc3339(expiration),
                "AccountId": "123456789012",
            }
            if self.cache and self.reusable((body, expiration, issued), issued):
                self.entries[uid] = (body, expiration, issued)
        answered = at + self.latency
        max_age = RUST.ask(op="max_age", expiration=expiration, now=answered)["max_age"]
        return 200, body, expiration, max_age


class Sidecar:
    """`iam-broker-proxy`'s cache and policy, one broker call per miss or background refresh."""

    def __init__(self, clock, broker, latency):
        self.clock, self.broker, self.latency = clock, broker, latency
        # sha256(authorization) -> [body, expiration, fresh_until, last_used, window]
        self.entries = {}
        self.tick = 0
        self.rotation_calls = 0
        self.rotation_sts = 0  # ... of which the broker answered with an STS call
        self.background = 0
        self.uncached = 0

    @staticmethod
    def servable(entry, now):
        return Sidecar.decide(entry, now) != "fetch"

    @staticmethod
    def decide(entry, now):
        """``Policy::decide``."""
        _, expiration, fresh_until, _, window = entry
        return RUST.ask(op="decide", expiration=expiration, fresh_until=fresh_until,
                        window=window, now=now)["answer"]

    def admit(self, key, body, expiration, max_age, now):
        """``Policy::admit``, then the cache's bound on entries (stale ones first, then LRU)."""
        admitted = RUST.ask(op="admit", expiration=expiration, max_age=max_age, now=now)
        if admitted["answer"] == "reject":
            return False
        if admitted["answer"] == "serve-once":
            self.uncached += 1
            return True
        if key not in self.entries and len(self.entries) >= CACHE_MAX_ENTRIES:
            stale = [k for k, e in self.entries.items() if not self.servable(e, now)]
            for old in stale:
                del self.entries[old]
            while len(self.entries) >= CACHE_MAX_ENTRIES:
                del self.entries[min(self.entries, key=lambda k: self.entries[k][3])]
        self.tick += 1
        self.entries[key] = [body, expiration, admitted["fresh_until"], self.tick, admitted["window"]]
        return True

    def fetch(self, authorization, key, background):
        """One broker call. A foreground call moves the clock by the round trip."""
        sent = self.clock.t
        status, body, expiration, max_age = self.broker.call(authorization, sent)
        arrived = sent + self.latency
        if not background:
            self.clock.t = arrived
        if status != 200:
            self.entries.pop(key, None)
            return status, None
        if not self.admit(key, body, expiration, max_age, arrived):
            return 502, None
        return 200, body

    def get(self, authorization):
        now = self.clock.t
        key = hashlib.sha256(authorization.encode()).digest()
        self.tick += 1
        entry = self.entries.get(key)
        if entry is not None:
            decision = self.decide(entry, now)
            if decision != "fetch":
                entry[3] = self.tick
                if decision == "serve-and-refresh":
                    self.background += 1
                    self.fetch(authorization, key, background=True)
                return 200, entry[0]
            del self.entries[key]
        rotation = any(
            k != key and self.decide(e, now) != "fetch" for k, e in self.entries.items()
        )
        sts = self.broker.sts_calls
        answer = self.fetch(authorization, key, background=False)
        if rotation:
            self.rotation_calls += 1
            self.rotation_sts += self.broker.sts_calls - sts
        return answer


class SidecarFetcher:
    """Stands in for botocore's ContainerMetadataFetcher: the HTTP GET goes to the sidecar model."""

    def __init__(self, sidecar, stats):
        self.sidecar, self.stats = sidecar, stats

    def retrieve_full_uri(self, full_uri, headers=None):
        status, body = self.sidecar.get(headers["Authorization"])
        self.stats.record_fetch(self.sidecar.clock.t, body)
        if status != 200:
            raise MetadataRetrievalError(error_msg=f"Received non 200 response {status}")
        return body


class DirectFetcher:
    """Direct injection: the HTTP GET goes to the broker model itself, a full round trip."""

    def __init__(self, broker, stats):
        self.broker, self.stats = broker, stats

    def retrieve_full_uri(self, full_uri, headers=None):
        clock = self.broker.clock
        sent = clock.t
        status, body, _, _ = self.broker.call(headers["Authorization"], sent)
        clock.t = sent + self.broker.latency
        self.stats.record_fetch(clock.t, body if status == 200 else None)
        if status != 200:
            raise MetadataRetrievalError(error_msg=f"Received non 200 response {status}")
        return body


class Stats:
    def __init__(self, clock):
        self.clock = clock
        self.fetches = 0
        self.short_advisory = 0  # refreshed credentials with < 15 min left
        self.short_mandatory = 0  # ... with < 10 min left
        self.failed = 0  # fetches the sidecar answered with an error
        self.errors = []

    def record_fetch(self, now, body):
        self.fetches += 1
        if body is None:
            self.failed += 1
            return
        left = datetime.datetime.strptime(body["Expiration"], "%Y-%m-%dT%H:%M:%SZ").replace(
            tzinfo=datetime.timezone.utc
        ).timestamp() - now
        if left < ADVISORY:
            self.short_advisory += 1
        if left < MANDATORY:
            self.short_mandatory += 1


class Process:
    """A botocore process in the pod: the real ContainerProvider and RefreshableCredentials."""

    def __init__(self, name, environ, fetcher, stats, clock):
        self.name, self.clock, self.stats = name, clock, stats
        provider = ContainerProvider(environ=environ, fetcher=fetcher)
        self.credentials = provider.load()
        # botocore binds its default time_fetcher (the wall clock) at construction; the fake
        # clock replaces it, which is what the `time_fetcher` parameter is for.
        self.credentials._time_fetcher = clock.now_dt

    def aws_call(self):
        """What botocore's signer does before every request."""
        try:
            self.credentials.get_frozen_credentials()
        except Exception as error:  # noqa: BLE001 - every failure is a finding
            self.stats.errors.append((self.clock.t - T0, self.name, repr(error)))


def parse_workload(text):
    parts = text.split(":")
    if parts[0] in ("service", "cli") and len(parts) == 2:
        return parts[0], 1, float(parts[1])
    if parts[0] == "workers" and len(parts) == 3:
        return "workers", int(parts[1]), float(parts[2])
    raise argparse.ArgumentTypeError(f"unknown workload {text!r}")


def describe(workload):
    kind, count, interval = workload
    every = f"{interval:g} s"
    if kind == "service":
        return f"1 process, a call every {every}"
    if kind == "workers":
        return f"{count} processes, each a call every {every}"
    return f"a new process (CLI) every {every}"


def simulate(
    duration, workload, hours, latency, kubelet_lag, token_expiration,
    injection="sidecar", broker_cache=True, rotate=True,
):
    """One pod for `hours`; with `rotate=False` the token file is never rewritten (and the token
    never expires): the counterfactual that tells what the rotations added."""
    kind, count, interval = workload
    clock = Clock()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "token")
        kubelet = Kubelet(clock, path, token_expiration if rotate else 10 * hours * 3600, kubelet_lag)
        broker = Broker(clock, kubelet, duration, latency, cache=broker_cache)
        sidecar = Sidecar(clock, broker, latency)
        stats = Stats(clock)
        if injection == "direct":
            fetcher = DirectFetcher(broker, stats)
            uri = "https://iam-broker.example/credentials?role=sim"
        else:
            fetcher = SidecarFetcher(sidecar, stats)
            uri = "http://127.0.0.1:53080/?role=sim"
        environ = {
            "AWS_CONTAINER_CREDENTIALS_FULL_URI": uri,
            "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE": path,
        }
        end = T0 + hours * 3600
        # Events: (time, order, kind, index). kubelet goes first at equal times.
        events = [(kubelet.next_rotation(), 0, "rotate", 0)] if rotate else []
        processes = []
        if kind == "cli":
            events.append((T0, 1, "cli", 0))
        else:
            for i in range(count):
                events.append((T0 + 7 * i, 1, "start", i))
        heapq.heapify(events)
        while events:
            at, order, what, index = heapq.heappop(events)
            if at >= end:
                break
            clock.t = max(clock.t, at)
            if what == "rotate":
                kubelet.rotate()
                heapq.heappush(events, (kubelet.next_rotation(), 0, "rotate", 0))
            elif what == "start":
                processes.append(Process(f"p{index}", environ, fetcher, stats, clock))
                heapq.heappush(events, (at + interval, 1, "call", len(processes) - 1))
            elif what == "call":
                processes[index].aws_call()
                heapq.heappush(events, (at + interval, 1, "call", index))
            else:  # cli: a fresh process makes one call and exits
                try:
                    Process("cli", environ, fetcher, stats, clock).aws_call()
                except Exception as error:  # noqa: BLE001
                    stats.errors.append((clock.t - T0, "cli", repr(error)))
                heapq.heappush(events, (at + interval, 1, "cli", 0))
    return {
        "broker": broker.calls,
        "sts": broker.sts_calls,
        "hits": broker.hits,
        "refused": broker.refused,
        "rotation": sidecar.rotation_calls,
        "rotation_sts": sidecar.rotation_sts,
        "background": sidecar.background,
        "uncached": sidecar.uncached,
        "fetches": stats.fetches,
        "short_advisory": stats.short_advisory,
        "short_mandatory": stats.short_mandatory,
        "errors": stats.errors,
        "failed": stats.failed,
        "rotations": kubelet.rotations,
    }


def choices(text, allowed, what):
    picked = [c.strip() for c in text.split(",") if c.strip()]
    for c in picked:
        if c not in allowed:
            raise SystemExit(f"--{what}: unknown {c!r} (one or more of {', '.join(allowed)})")
    return picked


def label(injection, cache):
    return injection if cache else f"{injection}, no broker cache"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--durations", default="900,1800,2700,3600")
    parser.add_argument(
        "--workloads",
        default="service:1,service:60,workers:4:1,cli:60,cli:10",
        help="comma-separated: service:N, workers:K:N, cli:N (N seconds between calls)",
    )
    parser.add_argument(
        "--injection", default="sidecar,direct",
        help="comma-separated: sidecar (SDK -> sidecar -> broker), direct (SDK -> broker)",
    )
    parser.add_argument(
        "--broker-cache", default="on,off",
        help="comma-separated: on (the broker's credential cache), off (before it)",
    )
    parser.add_argument("--hours", type=float, default=24)
    parser.add_argument(
        "--latency", type=float, default=0.1,
        help="round trip of a broker request (sidecar or SDK - broker - STS), s",
    )
    parser.add_argument("--kubelet-lag", type=float, default=0.0)
    parser.add_argument("--token-expiration", type=int, default=TOKEN_EXPIRATION)
    args = parser.parse_args()
    durations = [int(d) for d in args.durations.split(",")]
    workloads = [parse_workload(w) for w in args.workloads.split(",")]
    injections = choices(args.injection, ("sidecar", "direct"), "injection")
    caches = [c == "on" for c in choices(args.broker_cache, ("on", "off"), "broker-cache")]
    runs = [(i, c) for c in caches for i in injections]
    one_hour = RUST.ask(op="broker_reusable", expiration=3600, issued=0, now=0)["refresh_point"]
    shortest = RUST.ask(op="broker_reusable", expiration=900, issued=0, now=0)["refresh_point"]

    print(
        f"botocore {botocore.__version__}: advisory refresh {ADVISORY} s, mandatory {MANDATORY} s "
        f"before expiry. Sidecar: min validity {MIN_VALIDITY} s, refresh ahead {REFRESH_AHEAD} s, "
        f"{CACHE_MAX_ENTRIES} entries. Broker: max-age = expiry - {CACHE_MARGIN} s, token leeway "
        f"{LEEWAY} s, credential cache per pod uid reused while more than the refresh point is "
        f"left ({one_hour:g} s of 3600 s credentials, {shortest:g} s of 900 s). Token "
        f"expirationSeconds {args.token_expiration} (file rewritten every "
        f"{min(0.8 * args.token_expiration, DAY) + args.kubelet_lag:g} s). {args.hours:g} h "
        f"simulated, {args.latency:g} s per broker round trip."
    )
    per_hour = lambda n: f"{n / args.hours:.2f}"  # noqa: E731
    results = {}
    for workload in workloads:
        for duration in durations:
            for injection, cache in runs:
                common = (duration, workload, args.hours, args.latency, args.kubelet_lag,
                          args.token_expiration)
                r = simulate(*common, injection=injection, broker_cache=cache)
                r["still"] = simulate(*common, injection=injection, broker_cache=cache, rotate=False)
                results[(workload, duration, injection, cache)] = r

    # Summary: sidecar and direct side by side.
    cached = [i for i, c in runs if c]
    uncached = [i for i, c in runs if not c]
    head = ["CREDENTIAL_DURATION_SECONDS", "workload"]
    head += [f"STS / pod-hour: {i}" for i in cached]
    both = "sidecar" in cached and "direct" in cached
    if both:
        head.append("direct ÷ sidecar")
    head += [f"broker requests / pod-hour: {i}" for i in cached]
    head += [f"STS / pod-hour, no broker cache: {i}" for i in uncached]
    head += [f"SDK fetches / h: {i}" for i in cached or uncached]
    print()
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for workload in workloads:
        for duration in durations:
            row = [str(duration), describe(workload)]
            get = lambda i, c: results[(workload, duration, i, c)]  # noqa: E731
            row += [per_hour(get(i, True)["sts"]) for i in cached]
            if both:
                side, direct = get("sidecar", True)["sts"], get("direct", True)["sts"]
                row.append(f"{direct / side:.2f}" if side else "—")
            row += [per_hour(get(i, True)["broker"]) for i in cached]
            row += [per_hour(get(i, False)["sts"]) for i in uncached]
            row += [per_hour(get(i, bool(cached))["fetches"]) for i in cached or uncached]
            print("| " + " | ".join(row) + " |")

    # Every run.
    print()
    print(
        "| CREDENTIAL_DURATION_SECONDS | workload | injection | broker requests / pod-hour "
        "| broker-cache hits / h | STS calls / pod-hour "
        "| sidecar misses after a token rotation / h (STS) | added by rotation (vs. never rotated) "
        "| token rotations / h | SDK fetches / h "
        "| answers with < 15 min left (uncached) | with < 10 min left | botocore errors |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    notes = []
    for workload in workloads:
        for duration in durations:
            for injection, cache in runs:
                r = results[(workload, duration, injection, cache)]
                still = r["still"]
                rotation = (
                    f"{per_hour(r['rotation'])} ({per_hour(r['rotation_sts'])})"
                    if injection == "sidecar" else "—"
                )
                uncached_answers = f" ({r['uncached']})" if injection == "sidecar" else ""
                print(
                    f"| {duration} | {describe(workload)} | {label(injection, cache)} "
                    f"| {per_hour(r['broker'])} | {per_hour(r['hits'])} | {per_hour(r['sts'])} "
                    f"| {rotation} | {(r['sts'] - still['sts']) / args.hours:+.2f} "
                    f"| {per_hour(r['rotations'])} | {per_hour(r['fetches'])} "
                    f"| {r['short_advisory']}{uncached_answers} | {r['short_mandatory']} "
                    f"| {len(r['errors'])} |"
                )
                where = f"{duration} s, {describe(workload)}, {label(injection, cache)}"
                if r["failed"]:
                    notes.append(f"{where}: {r['failed']} failed SDK fetches")
                if r["refused"]:
                    notes.append(f"{where}: {r['refused']} broker refusals")
                for at, who, error in r["errors"][:3]:
                    notes.append(f"{where}: {who} at {at:.0f} s: {error}")
    if notes:
        print()
        for note in notes:
            print(f"- {note}")


if __name__ == "__main__":
    main()
