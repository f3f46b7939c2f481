#!/usr/bin/env python3
"""Invokes every file of events/ through `cargo lambda invoke` and compares each answer with the
table in events/README.md (used by `scripts/lambda-watch.sh --check`).

    lambda_events_check.py EVENTS_DIR HTTP_PORT CLEANUP_PORT RESEED_COMMAND...

Events documented as `cleanup` go to the cleanup handler's port, the rest to the http handler's.
RESEED_COMMAND runs before each invocation (the DELETE event removes the fixtures' token).
"""

import json
import pathlib
import re
import subprocess
import sys


def documented(readme):
    rows = re.findall(r"^\| `([\w.-]+\.json)` \| ([^|]+) \|$", readme.read_text(), re.M)
    return {name: answer.strip() for name, answer in rows}


def observed(answer):
    if "statusCode" not in answer:
        ok = answer.get("failures") == 0 and "secretsDeleted" in answer
        return "cleanup" if ok else json.dumps(answer)
    status = answer["statusCode"]
    body = json.loads(answer.get("body") or "null")
    if isinstance(body, dict) and "Code" in body:
        return f"{status} {body['Code']}"
    if isinstance(body, dict) and "response" in body:
        response = body["response"]
        if not response.get("allowed"):
            return f"{status} denied"
        return f"{status} patch" if response.get("patch") else f"{status} no patch"
    if isinstance(body, dict) and "AccessKeyId" in body:
        return f"{status} credentials"
    if isinstance(body, dict) and body.get("status") == "ok":
        return f"{status} ok"
    return f"{status} {json.dumps(body)[:80]}"


def main():
    events, http_port, cleanup_port = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    reseed = sys.argv[4:]
    expected = documented(events / "README.md")
    files = sorted(p.name for p in events.glob("*.json"))
    undocumented = sorted(set(files) - set(expected))
    failures = [f"{name}: not in events/README.md" for name in undocumented]
    failures += [f"{name}: documented but missing" for name in sorted(set(expected) - set(files))]
    for name in files:
        if name not in expected:
            continue
        subprocess.run(reseed, check=True)
        port = cleanup_port if expected[name] == "cleanup" else http_port
        result = subprocess.run(
            ["cargo", "lambda", "invoke", "bootstrap", "-A", "127.0.0.1", "-P", port,
             "--data-file", str(events / name), "--output-format", "json"],
            capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            got = f"invoke failed: {result.stderr.strip()[-300:]}"
        else:
            got = observed(json.loads(result.stdout))
        mark = "ok  " if got == expected[name] else "FAIL"
        print(f"{mark} {name:45} {got}", file=sys.stderr)
        if got != expected[name]:
            failures.append(f"{name}: expected {expected[name]!r}, got {got!r}")
    if failures:
        print("\n".join(["events/ answers differ from events/README.md:", *failures]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
