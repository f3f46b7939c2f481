"""README's code blocks, run as written: one script in a fresh `bash`.

A code block belongs to a rehearsed path when the line before its ```sh fence is
`<!-- rehearsed: NAME ... -->`; `blocks(readme, NAME)` returns that path's blocks in README order.
`run()` joins them into one script under `set -eo pipefail` and runs it in `bash` with an
environment that holds only what an operator's workstation has (PATH, HOME, AWS credentials, a
kubeconfig) plus the rehearsal's one translation (`AWS_ENDPOINT_URL`: AWS is moto). Every
variable README's commands use must come from README's own lines. Each command is printed as
README wrote it (a DEBUG trap) before it runs.

`iam-broker` is the real binary. `sam` and `kubectl` are shims: each hands its arguments (and,
for `-`, its stdin) to the rehearsal over a local HTTP call, and the rehearsal plays AWS
CloudFormation or the API server and answers an exit code, stdout and stderr
(`handle(tool, argv, stdin, env, cwd)`). A command the rehearsal does not model answers an error,
which stops the script: README cannot carry a command the rehearsal did not run.
"""

import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_BLOCK = re.compile(r"^<!-- rehearsed: ([\w-]+)[^\n]*-->\n```(?:sh|bash)\n(.*?)^```", re.M | re.S)

_SHIM = '''#!{python}
# `{tool}` as the deploy rehearsal plays it (scripts/rehearse_deploy/readme_shell.py)
import json, os, sys, urllib.request
argv = sys.argv[1:]
request = json.dumps({{
    "tool": "{tool}", "argv": argv, "cwd": os.getcwd(),
    "stdin": sys.stdin.read() if "-" in argv else "",
    "env": {{k: os.environ[k] for k in ("AWS_REGION", "AWS_DEFAULT_REGION") if k in os.environ}},
}}).encode()
with urllib.request.urlopen(urllib.request.Request("{url}", data=request), timeout=600) as answer:
    result = json.load(answer)
sys.stdout.write(result["stdout"])
sys.stderr.write(result["stderr"])
sys.exit(result["rc"])
'''


def blocks(readme, name):
    """The code blocks of rehearsed path `name`, in README order."""
    return [body for path, body in _BLOCK.findall(readme) if path == name]


class _Calls(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, handle):
        super().__init__(("127.0.0.1", 0), _CallHandler)
        self.handle_call = handle
        self.failures = []


class _CallHandler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - http.server's name
        call = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        try:
            rc, out, err = self.server.handle_call(call["tool"], call["argv"], call["stdin"],
                                                   call["env"], call["cwd"])
        except Exception as error:  # noqa: BLE001 - the script fails; run() re-raises it
            self.server.failures.append(error)
            rc, out, err = 1, "", f"rehearsal: {error}\n"
        body = json.dumps({"rc": rc, "stdout": out, "stderr": err}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def run(script_blocks, work, checkout, iam_broker, handle, workstation_env, links):
    """Runs `script_blocks` as one script in a fresh bash, in a folder of `work` where `links`
    (paths of the checkout: deploy/, template.yaml, ...) are what README's commands expect to
    find. Prints the transcript; returns bash's exit code and the transcript (each command,
    then its stdout and stderr). An exception raised by `handle`
    (a failed check while playing `sam` or `kubectl`) is raised again here."""
    calls = _Calls(handle)
    threading.Thread(target=calls.serve_forever, daemon=True).start()
    try:
        folder, tools, home = (os.path.join(work, d) for d in ("checkout", "bin", "home"))
        for d in (folder, tools, home):
            os.makedirs(d, exist_ok=True)
        for link in links:
            os.symlink(os.path.join(checkout, link), os.path.join(folder, link))
        url = f"http://127.0.0.1:{calls.server_address[1]}/"
        for tool in ("sam", "kubectl"):
            path = os.path.join(tools, tool)
            with open(path, "w") as f:
                f.write(_SHIM.format(python=sys.executable, tool=tool, url=url))
            os.chmod(path, 0o755)
        os.symlink(iam_broker, os.path.join(tools, "iam-broker"))
        script = os.path.join(work, "readme.sh")
        with open(script, "w") as f:
            f.write("set -eo pipefail\n"
                    "trap 'printf \"$ %s\\n\" \"$BASH_COMMAND\"' DEBUG\n")
            f.write("\n".join(script_blocks))
        env = {"PATH": f"{tools}:/usr/local/bin:/usr/bin:/bin", "HOME": home, "LANG": "C.UTF-8",
               **workstation_env}
        result = subprocess.run(["bash", script], cwd=folder, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                timeout=600)
        for line in result.stdout.splitlines():
            print(f"    {line}" if line.startswith("$ ") else f"      {line}", file=sys.stderr)
        if calls.failures:
            raise calls.failures[0]
        return result.returncode, result.stdout
    finally:
        calls.shutdown()
        calls.server_close()
