"""The house's import rule (dashflow/app/layers.py): checked on the real tree, and shown to
catch each kind of break on a small tree that has them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from dashflow.app import layers

ROOT = Path(__file__).resolve().parents[1]


def test_the_project_keeps_its_import_rule():
    assert layers.violations(ROOT) == []


def test_no_module_is_installed_under_a_bare_name(tmp_path):
    # from outside the checkout, only dashflow.* exists
    probe = ("import importlib.util as u; import dashflow.tasks.sample, dashflow.flows.dash_rl; "
             "print(u.find_spec('tasks'), u.find_spec('flows'))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["None", "None"]


def _tree(root: Path, files: dict[str, str]) -> Path:
    for folder in ("dashflow/core", "dashflow/ops", "dashflow/app", "tasks", "flows"):
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / "__init__.py").write_text("")
    (root / "dashflow" / "__init__.py").write_text("__version__ = '0'\n")
    for rel, text in files.items():
        (root / rel).write_text(text)
    return root


def test_each_kind_of_break_is_named(tmp_path):
    root = _tree(tmp_path, {
        "dashflow/core/store.py": "def f():\n    from dashflow.tasks import sample\n",        # back up, inside a function
        "dashflow/core/a.py": "from dashflow.core import b\n",
        "dashflow/core/b.py": "from . import a\n",                                          # a circle, relative
        "tasks/sample.py": "from dashflow.core import store\n",
        "tasks/learn.py": "from dashflow.tasks.sample import x\n",                        # a stage imports a stage
        "flows/run.py": "from dashflow.app import cli\n",                                 # flows import the app
        "dashflow/ops/retention.py": "from tasks import store\n",                         # a bare name
        "dashflow/app/cli.py": "from dashflow.flows import run\nfrom dashflow.core import store\n",  # allowed
    })
    found = layers.violations(root)
    assert len(found) == 5, found
    text = "\n".join(found)
    assert "dashflow/core/store.py:2: core imports tasks (dashflow.tasks.sample)" in text
    assert "tasks/learn.py:1: a stage imports another stage (dashflow.tasks.sample)" in text
    assert "flows/run.py:1: flows imports app (dashflow.app.cli)" in text
    assert "dashflow/ops/retention.py:1: imports 'tasks' under a bare name" in text
    assert "circular imports: dashflow.core.a -> dashflow.core.b -> dashflow.core.a" in text


def test_the_command_fails_on_a_broken_tree(tmp_path):
    root = _tree(tmp_path, {"tasks/learn.py": "from dashflow.tasks import sample\n", "tasks/sample.py": ""})
    bad = subprocess.run([sys.executable, "-m", "dashflow.app.cli", "layers", "--root", str(root)],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "a stage imports another stage (dashflow.tasks.sample)" in bad.stderr
    good = subprocess.run([sys.executable, "-m", "dashflow.app.cli", "layers", "--root", str(ROOT)],
                          capture_output=True, text=True)
    assert good.returncode == 0 and "import rule: ok" in good.stdout
