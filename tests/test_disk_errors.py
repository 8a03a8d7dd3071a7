"""Operating-system errors on the run root as one line naming the path and what to do (issue 40):
a read-only file system, a full disk. Real mounts: a tmpfs in a user and mount namespace of its
own (`unshare --map-root-user --mount`), which root (CI) and an ordinary user can both make."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from dashflow.core.config import Params
from dashflow.tasks import prepare

pytestmark = pytest.mark.slow

CLI = f"{sys.executable} -m dashflow.app.cli"


def _in_namespace(tmp_path: Path, script: str) -> dict[str, str]:
    """Run a bash script as root of a new user + mount namespace; returns the files it wrote to out/."""
    if not shutil.which("unshare"):
        pytest.fail("util-linux unshare is needed (it makes the namespace the mounts live in)")
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "script.sh").write_text(f"set -u\ncd {ROOT}\nOUT={out}\nMNT={tmp_path / 'mnt'}\nmkdir -p $MNT\n"
                                        + script)
    done = subprocess.run(["unshare", "--map-root-user", "--mount", "bash", str(tmp_path / "script.sh")],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    return {p.name: p.read_text() for p in out.iterdir()}


def test_a_read_only_run_root_is_one_line_naming_it(tmp_path):
    got = _in_namespace(tmp_path, f"""
mount -t tmpfs -o ro,size=1m none $MNT
{CLI} run --params params/tiny.yaml --set run.root=$MNT --set run.name=tiny > $OUT/stdout 2> $OUT/stderr
echo $? > $OUT/rc
""")
    mnt = tmp_path / "mnt"
    assert got["rc"].strip() == "1"
    assert "Traceback" not in got["stderr"] + got["stdout"]
    assert got["stderr"].strip().splitlines()[-1] == (
        f"error: dashflow: {mnt}/tiny is on a read-only file system: point run.root at a writable directory "
        "(--set run.root=DIR)")


def test_a_full_disk_is_one_line_leaves_nothing_half_written_and_the_rerun_lands_the_same_bytes(tmp_path):
    """prepare copies the 0.54 GB base checkpoint into a 20 MB tmpfs: ENOSPC. One line naming the
    output (not the copy's source) and a `df` of a directory that is there; no staging
    directory and no manifest left; with the tmpfs grown, the same command lands the bytes a
    prepare on an ordinary disk lands."""
    args = "stage prepare --params params/tiny.yaml --set run.name=tiny --set run.root"
    got = _in_namespace(tmp_path, f"""
mount -t tmpfs -o size=20m none $MNT
{CLI} {args}=$MNT > $OUT/stdout1 2> $OUT/stderr1; echo $? > $OUT/rc1
find $MNT -mindepth 1 | sort > $OUT/left
mount -o remount,size=1g $MNT
{CLI} {args}=$MNT > $OUT/stdout2 2> $OUT/stderr2; echo $? > $OUT/rc2
cp $MNT/tiny/base/policy/_manifest.json $OUT/policy.json
cp $MNT/tiny/base/prompts/_manifest.json $OUT/prompts.json
""")
    mnt = tmp_path / "mnt"
    assert got["rc1"].strip() == "1" and "Traceback" not in got["stderr1"] + got["stdout1"]
    line = got["stderr1"].strip().splitlines()[-1]
    assert line == (f"error: prepare_policy: no space left on the device holding {mnt}/tiny/base/policy (`df -h "
                    f"{mnt}/tiny/base`): free space -- older checkpoints (params.yaml `retention:`, `dashflow "
                    "prune`), scratch runs -- and run the same command again; finished stages are kept")
    assert not [p for p in got["left"].split() if "policy" in p or "_manifest" in p]   # nothing that looks done
    assert got["rc2"].strip() == "0", got["stderr2"]
    # the same bytes as a prepare on an ordinary disk
    params = Params.load(ROOT / "params" / "tiny.yaml", {"run.root": str(tmp_path / "disk"), "run.name": "tiny"})
    prepare.run(params)
    for name, directory in (("policy.json", params.layout.policy(-1)), ("prompts.json", params.layout.base / "prompts")):
        on_disk = json.loads((directory / "_manifest.json").read_text())
        assert json.loads(got[name])["digest"] == on_disk["digest"], name
