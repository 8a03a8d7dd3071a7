"""`dashflow serve` and `dashflow deploy`: Prefect's own server and process worker on one machine.

serve  : `prefect server start` (SQLite under $PREFECT_HOME, bound to 127.0.0.1) and
         `prefect worker start --pool dashflow-local --type process` (the pool is created
         if missing), as child processes; Ctrl-C or SIGTERM stops both, worker first.
deploy : `prefect --no-prompt deploy --all` from the project directory (prefect.yaml),
         after checking that the server answers.
"""

from __future__ import annotations

import os
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


def _prefect(*args: str) -> list[str]:
    return [sys.executable, "-m", "prefect", *args]


def _env(url: str | None = None, **extra: str) -> dict:
    env = dict(os.environ, PREFECT_SERVER_ANALYTICS_ENABLED="false", DVC_NO_ANALYTICS="1", **extra)
    if url:
        env["PREFECT_API_URL"] = url
    return env


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
    log_dir = Path(log_dir or Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect")) / "dashflow-serve")
    log_dir.mkdir(parents=True, exist_ok=True)
    procs: list[tuple[str, subprocess.Popen]] = []
    stopping = False

    def stop_all(*_):
        nonlocal stopping
        stopping = True

    old = {s: signal.signal(s, stop_all) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server = subprocess.Popen(_prefect("server", "start", "--host", host, "--port", str(port)), env=_env(),
                                  stdout=open(log_dir / "server.log", "w"), stderr=subprocess.STDOUT,
                                  start_new_session=True)
        procs.append(("server", server))
        deadline = time.time() + startup_timeout
        while not healthy(url):
            if server.poll() is not None or stopping or time.time() > deadline:
                tail = (log_dir / "server.log").read_text()[-2000:]
                raise ServeError(f"the Prefect server did not start at {url} (log {log_dir / 'server.log'}):\n{tail}")
            time.sleep(0.5)
        worker = subprocess.Popen(_prefect("worker", "start", "--pool", pool, "--type", "process"), env=_env(url),
                                  stdout=open(log_dir / "worker.log", "w"), stderr=subprocess.STDOUT,
                                  start_new_session=True)
        procs.append(("worker", worker))
        print(f"Prefect server : {url.removesuffix('/api')}  (UI; log {log_dir / 'server.log'}, pid {server.pid})")
        print(f"process worker : pool {pool!r}  (log {log_dir / 'worker.log'}, pid {worker.pid})")
        print(f"in another shell: export PREFECT_API_URL={url}")
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
        for s, handler in old.items():
            signal.signal(s, handler)
        print("stopped server and worker", flush=True)


def deploy(project: Path, url: str | None = None) -> int:
    url = require_server(url)
    project = Path(project).resolve()
    if not (project / "prefect.yaml").is_file():
        raise ServeError(f"no prefect.yaml in {project}; run `dashflow deploy` from the dashflow project directory")
    cmd = _prefect("--no-prompt", "deploy", "--all")
    return subprocess.call(cmd, cwd=project, env=_env(url, PWD=str(project)))
