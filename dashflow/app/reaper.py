"""Nothing a dashflow command started outlives it, `kill -9` included.

Some processes are started for a command by libraries it does not control: Prefect's
temporary API server (a uvicorn child, stopped only by Prefect's exit handler), a local Ray
cluster's gcs_server, raylet, workers and the agents the raylet starts (stopped only by
`ray.shutdown()`). A `kill -9` of the command runs neither, and they live on with parent 1.

`watch()` starts one small guard process per command (its own session, so Ctrl-C and a
kill of the command's process group do not reach it). Every half second the guard records
the command's descendants (pid and start time, read from /proc); once the command has
exited, in any way, it sends SIGTERM to every recorded process still running (and to
their own descendants), waits up to 10 s, then SIGKILLs what is left. After a clean exit
there is nothing left to stop and the guard just exits.

Run as a script (`python reaper.py PID`) it is the guard; it imports the standard library only.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

POLL_S = 0.5
GRACE_S = 10.0
_watching: dict[int, subprocess.Popen] = {}


def watch() -> subprocess.Popen:
    """Guard this process's descendants (once per process; later calls return the same guard)."""
    pid = os.getpid()
    if pid not in _watching:
        _watching[pid] = subprocess.Popen([sys.executable, "-S", str(Path(__file__).resolve()), str(pid)],
                                          stdin=subprocess.DEVNULL, start_new_session=True)
    return _watching[pid]


def _table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, start time in clock ticks) for every running process."""
    out = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":  # a zombie has ended; its parent only has not collected it
            out[int(entry.name)] = (int(fields[1]), fields[19])
    return out


def _below(roots: set[int], table: dict[int, tuple[int, str]]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _guard(parent: int) -> None:
    me = os.getpid()
    table = _table()
    if parent not in table:
        return
    born = table[parent][1]
    seen: dict[int, str] = {}  # every descendant of the command seen so far: pid -> start time

    def alive(table) -> set[int]:
        return {p for p, start in seen.items() if p in table and table[p][1] == start}

    while True:
        table = _table()
        parent_alive = parent in table and table[parent][1] == born
        seen = {pid: seen[pid] for pid in alive(table)}  # the ended ones are forgotten
        for pid in _below(set(seen) | ({parent} if parent_alive else set()), table) - {me}:
            seen[pid] = table[pid][1]
        if not parent_alive:
            break
        time.sleep(POLL_S)
    for sig, wait in ((signal.SIGTERM, GRACE_S), (signal.SIGKILL, 0.0)):
        table = _table()
        for pid in _below(alive(table), table) - {me}:  # started since the last look
            seen[pid] = table[pid][1]
        left = alive(table)
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        end = time.monotonic() + wait
        while time.monotonic() < end and alive(_table()):
            time.sleep(0.2)


if __name__ == "__main__":
    _guard(int(sys.argv[1]))
