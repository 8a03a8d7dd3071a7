"""`dashflow serve` and `dashflow deploy`: Prefect's own server and process worker on one machine.

serve  : `prefect server start` (SQLite under $PREFECT_HOME, bound to 127.0.0.1, basic auth
         with a string generated per start, written 0600 to
         $PREFECT_HOME/dashflow-serve/api-auth: every API call but /health needs it) and
         `prefect worker start --pool dashflow-local --type process` (the pool is created
         if missing), as child processes; Ctrl-C or SIGTERM stops both, worker first.
         Each child's process group is watched by a small guard process that reads a pipe
         from `serve`: when `serve` dies in any way (kill -9 included) the pipe closes and
         the guard stops the group (SIGTERM, then SIGKILL after 10 s).
deploy : `prefect --no-prompt deploy --all` from the project directory (prefect.yaml),
         after checking that the server answers; clients take the auth string from
         PREFECT_API_AUTH_STRING, else from that file.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

POOL = "dashflow-local"


class ServeError(RuntimeError):
    pass


def api_url(host: str = "127.0.0.1", port: int = 4200) -> str:
    return f"http://{host}:{port}/api"


def healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def require_server(url: str | None) -> str:
    """The API URL to use; a clear error when no server answers there."""
    url = url or os.environ.get("PREFECT_API_URL") or api_url()
    if not healthy(url):
        raise ServeError(f"no Prefect server answers at {url}. Start one with `dashflow serve` "
                         f"(and `export PREFECT_API_URL={url}`), or point PREFECT_API_URL at yours.")
    return url


def _serve_dir() -> Path:
    return Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect")) / "dashflow-serve"


def auth_file() -> Path:
    """Where `dashflow serve` keeps the API's auth string (user:password) for clients."""
    return _serve_dir() / "api-auth"


def _new_auth(path: Path) -> str:
    """A fresh auth string, written readable by this user only."""
    auth = f"dashflow:{secrets.token_urlsafe(24)}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(auth)
    return auth


def client_auth() -> str | None:
    """The auth string clients send: PREFECT_API_AUTH_STRING, else `dashflow serve`'s file."""
    if os.environ.get("PREFECT_API_AUTH_STRING"):
        return os.environ["PREFECT_API_AUTH_STRING"]
    return auth_file().read_text().strip() if auth_file().is_file() else None


def _prefect(*args: str) -> list[str]:
    return [sys.executable, "-m", "prefect", *args]


def _env(url: str | None = None, **extra: str) -> dict:
    env = dict(os.environ, PREFECT_SERVER_ANALYTICS_ENABLED="false", DVC_NO_ANALYTICS="1", **extra)
    if url:
        env["PREFECT_API_URL"] = url
    return env


_GUARD = """
import os, signal, sys, time
sys.stdin.buffer.read()          # returns when the pipe closes: serve stopped or died
group = int(sys.argv[1])
for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 0.0)):
    try:
        os.killpg(group, sig)
    except ProcessLookupError:
        break
    end = time.monotonic() + wait
    while time.monotonic() < end:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            sys.exit(0)
        time.sleep(0.2)
"""


def _guard(proc: subprocess.Popen) -> subprocess.Popen:
    """A process that stops `proc`'s process group once this process's end of its pipe
    closes (see the module doc); keep the returned Popen (its stdin) alive."""
    return subprocess.Popen([sys.executable, "-c", _GUARD, str(proc.pid)], stdin=subprocess.PIPE,
                            start_new_session=True)


def _stop(proc: subprocess.Popen, name: str, grace: float = 20.0) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        print(f"{name} did not stop in {grace:.0f} s; killing it", flush=True)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def serve(host: str = "127.0.0.1", port: int = 4200, pool: str = POOL, startup_timeout: float = 120.0,
          log_dir: Path | None = None) -> int:
    """Run server + worker until interrupted; returns the exit code."""
    url = api_url(host, port)
    if healthy(url):
        raise ServeError(f"a Prefect server already answers at {url}; stop it or pick another --port")
    log_dir = Path(log_dir or _serve_dir())
    log_dir.mkdir(parents=True, exist_ok=True)
    auth = _new_auth(log_dir / "api-auth")
    procs: list[tuple[str, subprocess.Popen]] = []
    guards: list[subprocess.Popen] = []
    stopping = False

    def stop_all(*_):
        nonlocal stopping
        stopping = True

    old = {s: signal.signal(s, stop_all) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server = subprocess.Popen(_prefect("server", "start", "--host", host, "--port", str(port)),
                                  env=_env(PREFECT_SERVER_API_AUTH_STRING=auth),
                                  stdout=open(log_dir / "server.log", "w"), stderr=subprocess.STDOUT,
                                  start_new_session=True)
        procs.append(("server", server))
        guards.append(_guard(server))
        deadline = time.time() + startup_timeout
        while not healthy(url):
            if server.poll() is not None or stopping or time.time() > deadline:
                tail = (log_dir / "server.log").read_text()[-2000:]
                raise ServeError(f"the Prefect server did not start at {url} (log {log_dir / 'server.log'}):\n{tail}")
            time.sleep(0.5)
        worker = subprocess.Popen(_prefect("worker", "start", "--pool", pool, "--type", "process"),
                                  env=_env(url, PREFECT_API_AUTH_STRING=auth),
                                  stdout=open(log_dir / "worker.log", "w"), stderr=subprocess.STDOUT,
                                  start_new_session=True)
        procs.append(("worker", worker))
        guards.append(_guard(worker))
        print(f"Prefect server : {url.removesuffix('/api')}  (UI; log {log_dir / 'server.log'}, pid {server.pid})")
        print(f"process worker : pool {pool!r}  (log {log_dir / 'worker.log'}, pid {worker.pid})")
        print(f"in another shell: export PREFECT_API_URL={url}")
        print(f"                 export PREFECT_API_AUTH_STRING=$(cat {log_dir / 'api-auth'})")
        print("                 dashflow deploy")
        print("                 prefect deployment run 'dash-rl/local' --param iterations=2 --param preset=dash")
        print("Ctrl-C stops both.", flush=True)
        while not stopping:
            for name, proc in procs:
                if proc.poll() is not None:
                    print(f"the {name} exited with code {proc.returncode} (log {log_dir / (name + '.log')}); "
                          "stopping", flush=True)
                    stopping = True
                    break
            time.sleep(0.5)
        return 0 if all(p.poll() is None for _, p in procs) else 1
    finally:
        for name, proc in reversed(procs):  # worker first, then the server
            _stop(proc, name)
        for guard in guards:  # nothing left to stop: they exit
            guard.stdin.close()
            guard.wait()
        for s, handler in old.items():
            signal.signal(s, handler)
        print("stopped server and worker", flush=True)


def deploy(project: Path, url: str | None = None) -> int:
    url = require_server(url)
    project = Path(project).resolve()
    if not (project / "prefect.yaml").is_file():
        raise ServeError(f"no prefect.yaml in {project}; run `dashflow deploy` from the dashflow project directory")
    cmd = _prefect("--no-prompt", "deploy", "--all")
    auth = client_auth()
    return subprocess.call(cmd, cwd=project, env=_env(url, PWD=str(project),
                                                      **({"PREFECT_API_AUTH_STRING": auth} if auth else {})))
