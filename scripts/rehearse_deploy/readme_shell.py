"""README's code blocks, run as written in a fresh `bash`: the operator's shell.

A code block belongs to a rehearsed path when the line before its ```sh fence is
`<!-- rehearsed: NAME ... -->`; `blocks(readme, NAME)` returns that path's blocks in README order.
A `Shell` is one `bash` under `set -eo pipefail` with an environment that holds only what an
operator's workstation has (PATH, HOME, AWS credentials, a kubeconfig) plus the rehearsal's one
translation (`AWS_ENDPOINT_URL`: AWS is moto). `Shell.run()` runs blocks in it, joined as one
script; a later `run()` continues in the same shell (its variables, its folder), so the
rehearsal can play the cluster and the pods between README's steps. Every variable README's
commands use must come from README's own lines. Each command is printed as README wrote it (a
DEBUG trap) before it runs.

`iam-broker` is the real binary. `sam` and `kubectl` are shims: each hands its arguments (and,
for `-`, its stdin) to the rehearsal over a local HTTP call, and the rehearsal plays AWS
CloudFormation or the API server and answers an exit code, stdout and stderr
(`handle(tool, argv, stdin, env, cwd)`). A command the rehearsal does not model answers an error,
which stops the script (and the shell): README cannot carry a command the rehearsal did not run.
"""

import json
import os
import re
import select
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


class Shell:
    """The operator's terminal: one `bash` that runs README's blocks, a `run()` at a time, so
    what a block exports or assigns (and the folder it writes in) is there for the next one, as
    in README's "in the shell of the secret-mode deploy". It starts in a folder of `work` where
    `links` (paths of the checkout: deploy/, template.yaml, ...) are what README's commands expect
    to find (`folder`: what they write, discovery.kubeconfig say, is there)."""

    def __init__(self, work, checkout, iam_broker, handle, workstation_env, links):
        self.work = work
        self.runs = 0
        self.calls = _Calls(handle)
        threading.Thread(target=self.calls.serve_forever, daemon=True).start()
        self.folder, tools, home = (os.path.join(work, d) for d in ("checkout", "bin", "home"))
        for d in (self.folder, tools, home):
            os.makedirs(d, exist_ok=True)
        for link in links:
            os.symlink(os.path.join(checkout, link), os.path.join(self.folder, link))
        url = f"http://127.0.0.1:{self.calls.server_address[1]}/"
        for tool in ("sam", "kubectl"):
            path = os.path.join(tools, tool)
            with open(path, "w") as f:
                f.write(_SHIM.format(python=sys.executable, tool=tool, url=url))
            os.chmod(path, 0o755)
        os.symlink(iam_broker, os.path.join(tools, "iam-broker"))
        # bash reads the path of each run's script from one pipe, sources it (its commands and
        # their output into the script's .out file) and answers on the other; a failed command
        # ends bash (set -e), which closes the answer pipe
        scripts, self.to_bash = os.pipe()
        self.from_bash, answers = os.pipe()
        driver = ("set -eo pipefail\n"
                  f"while IFS= read -r script <&{scripts}; do\n"
                  '  source "$script" >"$script.out" 2>&1\n'
                  "  trap - DEBUG\n"
                  f"  echo >&{answers}\n"
                  "done\n")
        env = {"PATH": f"{tools}:/usr/local/bin:/usr/bin:/bin", "HOME": home, "LANG": "C.UTF-8",
               **workstation_env}
        self.bash = subprocess.Popen(["bash", "-c", driver], cwd=self.folder, env=env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, pass_fds=(scripts, answers))
        os.close(scripts)
        os.close(answers)

    def run(self, script_blocks, timeout=600):
        """Runs `script_blocks` (joined) in the shell. Prints the transcript; returns the exit
        code (0, or the failed command's, which ends the shell) and the transcript (each command,
        then its stdout and stderr). An exception raised by `handle` (a failed check while
        playing `sam` or `kubectl`) is raised again here."""
        self.runs += 1
        script = os.path.join(self.work, f"readme-{self.runs}.sh")
        with open(script, "w") as f:
            f.write("trap 'printf \"$ %s\\n\" \"$BASH_COMMAND\"' DEBUG\n")
            f.write("\n".join(script_blocks))
        self.calls.failures = []
        status = None
        try:
            os.write(self.to_bash, f"{script}\n".encode())
        except BrokenPipeError:  # a run before this one stopped the shell
            status = self.bash.wait()
        if status is None:
            ready, _, _ = select.select([self.from_bash], [], [], timeout)
            if not ready:
                self.bash.kill()
            status = 0 if ready and os.read(self.from_bash, 1) else self.bash.wait()
        transcript = ""
        if os.path.exists(script + ".out"):
            with open(script + ".out", errors="replace") as f:
                transcript = f.read()
        for line in transcript.splitlines():
            print(f"    {line}" if line.startswith("$ ") else f"      {line}", file=sys.stderr)
        if self.calls.failures:
            raise self.calls.failures[0]
        return status, transcript

    def close(self):
        for fd in (self.to_bash, self.from_bash):
            os.close(fd)
        try:
            self.bash.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.bash.kill()
        self.calls.shutdown()
        self.calls.server_close()
