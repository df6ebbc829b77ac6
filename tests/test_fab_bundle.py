"""The Flower app bundle (FAB) that ``flwr run .`` builds holds only what the app needs, and
a virtual environment (any name), node packages or a deep scratch folder inside the project
do not make Flower refuse the app ("exceeds the maximum directory depth of 10").

Flower 1.42 (``flwr.cli.utils.filter_paths_for_publish``) checks the depth of every file it
would consider *before* pyproject's ``fab-include`` narrows the bundle, and at that stage it
honours only the app root's ``.gitignore``: the project's ``.gitignore`` carries the patterns."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from io import BytesIO
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk
from flwr.cli.utils import AppPathDepthError

ROOT = Path(__file__).resolve().parents[1]


def _project_copy(dest: Path) -> Path:
    """The files of the project the FAB builder reads (its code, its config, .gitignore),
    plus what a user leaves in a project folder: a virtual environment named ``myenv``, a
    ``node_modules`` and a scratch folder, each with files deeper than Flower's limit."""
    app = dest / "fedrec"  # a valid Flower app (folder) name
    app.mkdir()
    for name in ("pyproject.toml", ".gitignore", "README.md"):
        shutil.copy(ROOT / name, app / name)
    for folder in ("clients", "server", "fedrec"):
        shutil.copytree(ROOT / folder, app / folder, ignore=shutil.ignore_patterns("__pycache__"))
    deep = "a/b/c/d/e/f/g/h"
    for path in (f"myenv/lib/python3.11/site-packages/pkg/{deep}/mod.py", f"node_modules/pkg/{deep}/i/package.json",
                 "scratch/1/2/3/4/5/6/7/8/9/10/11/notes.md"):
        (app / path).parent.mkdir(parents=True, exist_ok=True)
        (app / path).write_text("# not part of the app\n")
    (app / "myenv" / "pyvenv.cfg").write_text("home = /usr/bin\n")
    return app


def test_a_project_with_a_venv_and_deep_folders_bundles_only_the_app(tmp_path):
    app = _project_copy(tmp_path)
    names = sorted(zipfile.ZipFile(BytesIO(build_fab_from_disk(app))).namelist())
    expected = sorted(["pyproject.toml", ".info/CONTENT",
                       *(p.relative_to(app).as_posix() for d in ("clients", "server") for p in (app / d).rglob("*.py"))])
    assert names == expected
    assert "server/app.py" in names and "clients/app.py" in names


def test_without_the_gitignore_patterns_flower_refuses_the_same_project(tmp_path):
    """The control: the same copy without the project's .gitignore is refused by Flower
    (so the test above shows the patterns at work, not a Flower that stopped checking)."""
    app = _project_copy(tmp_path)
    (app / ".gitignore").unlink()
    with pytest.raises(AppPathDepthError, match="maximum directory depth of 10"):
        build_fab_from_disk(app)


def test_flwr_build_on_the_copy_succeeds(tmp_path):
    """``flwr build`` (the command a user types; ``flwr run .`` builds the same way)."""
    app = _project_copy(tmp_path)
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home"), "FLWR_TELEMETRY_ENABLED": "0"}
    done = subprocess.run([str(Path(sys.executable).with_name("flwr")), "build", "--app", str(app)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Successfully built" in done.stdout and len(list(tmp_path.glob("*.fab"))) == 1
