"""The Flower app is found from the installed package: `fedrec simulate`, `fedrec compare`
and `fedrec app` work from any working directory, with no checkout beside them."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from fedrec.config import load_toml
from fedrec.errors import ConfigError
from fedrec.federated.runner import find_app_dir, installed_app_dir, load_components

ROOT = Path(__file__).resolve().parents[1]
FEDREC = Path(sys.executable).with_name("fedrec")
TINY_DATA = "synthetic:users=40,items=60,seed=2"
TINY_MODEL = ["--set", "model.dim=16", "--set", "model.max-len=20"]

COMPARE = f"""
title = "tiny"
data = "{TINY_DATA}"
task = "ctr"

[federated]
rounds = 2
shards = 2

[train]
epochs = 1

[[runs]]
name = "fed"
kind = "federated"
algorithm = "mrff"
[runs.options]
dim = 16
max-len = 20
"""


def _env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "flwr-home"
    home.mkdir(exist_ok=True)
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_TELEMETRY_ENABLED": "0"}
    env.pop("PYTHONPATH", None)  # nothing but the installed package may point at the checkout
    return env


def _outside_any_project(tmp_path: Path) -> None:
    """The premise of these tests: no pyproject.toml in tmp_path or above it."""
    found = [d for d in [tmp_path, *tmp_path.parents] if (d / "pyproject.toml").exists()]
    if found:
        pytest.skip(f"the temporary directory is inside a project ({found[0]}); use --basetemp outside it")


def _fedrec(tmp_path: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    if not FEDREC.exists():
        pytest.skip(f"no `fedrec` script beside {sys.executable}")
    _outside_any_project(tmp_path)
    work = tmp_path / "elsewhere"
    work.mkdir(exist_ok=True)
    return subprocess.run([str(FEDREC), *args], cwd=work, env=_env(tmp_path), capture_output=True, text=True,
                          timeout=timeout, check=False)


def _declares_app(d: Path) -> bool:
    app = load_toml(d / "pyproject.toml").get("tool", {}).get("flwr", {}).get("app", {})
    return {"serverapp", "clientapp"} <= set(app.get("components", {})) and "fab-include" in app


def test_find_app_dir_falls_back_to_the_installed_app(tmp_path):
    _outside_any_project(tmp_path)
    d = find_app_dir(tmp_path)
    assert d == installed_app_dir()
    assert _declares_app(d)
    assert (d / "clients" / "app.py").is_file() and (d / "server" / "app.py").is_file()


def test_find_app_dir_prefers_the_working_directory(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[tool.flwr.app.components]\nserverapp = "s:app"\nclientapp = "c:app"\n')
    (tmp_path / "sub").mkdir()
    assert find_app_dir(tmp_path / "sub") == tmp_path.resolve()


def test_a_foreign_server_module_already_imported_is_an_error(tmp_path, monkeypatch):
    other = tmp_path / "other" / "server"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("")
    monkeypatch.setitem(sys.modules, "server", importlib.util.module_from_spec(
        importlib.util.spec_from_file_location("server", other / "__init__.py",
                                               submodule_search_locations=[str(other)])))
    with pytest.raises(ConfigError, match="a different module 'server' is already imported"):
        load_components(installed_app_dir())


def _app_modules() -> dict:
    return {m: mod for m, mod in sys.modules.items() if m.split(".")[0] in ("server", "clients")}


def test_a_foreign_server_package_earlier_on_sys_path_does_not_shadow_ours(tmp_path, monkeypatch):
    other = tmp_path / "other"
    (other / "server").mkdir(parents=True)
    (other / "server" / "__init__.py").write_text("")
    (other / "server" / "app.py").write_text("raise RuntimeError('the wrong server.app')\n")
    saved = _app_modules()
    for name in saved:
        del sys.modules[name]
    monkeypatch.setattr(sys, "path", [str(other), *sys.path])
    app_dir = installed_app_dir()
    try:
        load_components(app_dir)
        assert Path(sys.modules["server.app"].__file__).resolve().is_relative_to(app_dir)
        assert Path(sys.modules["clients.app"].__file__).resolve().is_relative_to(app_dir)
    finally:  # leave sys.modules as it was (other tests hold the modules loaded before)
        for name in _app_modules():
            del sys.modules[name]
        sys.modules.update(saved)


def test_fedrec_app_prints_the_installed_app(tmp_path):
    done = _fedrec(tmp_path, "app", timeout=120)
    assert done.returncode == 0, done.stderr
    d = Path(done.stdout.strip())
    assert d == installed_app_dir() and _declares_app(d)


def test_simulate_from_any_directory(tmp_path):
    done = _fedrec(tmp_path, "simulate", "--data", TINY_DATA, "--rounds", "2", "--clients", "2",
                   "--set", "eval-every=1", *TINY_MODEL, "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["algorithm"] == "mrff" and result["rounds"] == 2 and result["nodes"] == 2
    assert [h["round"] for h in result["history"]] == [1, 2]
    assert 0.0 <= result["test"]["auc"] <= 1.0


def test_compare_from_any_directory_and_with_app(tmp_path):
    config = tmp_path / "tiny.toml"
    config.write_text(COMPARE)
    out = tmp_path / "out"
    done = _fedrec(tmp_path, "compare", str(config), "--seed", "0", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "tiny.json").read_text())
    assert set(results) == {"fed/seed0"} and results["fed/seed0"]["kind"] == "federated"
    assert "| fed | federated |" in done.stdout
    # --app reaches the federated rows: a directory that is no Flower app is refused
    done = _fedrec(tmp_path, "compare", str(config), "--seed", "1", "--out", str(out), "--app", str(tmp_path))
    assert done.returncode == 2 and "not a Flower app directory" in done.stderr, done.stderr[-3000:]


def test_the_wheel_bundles_the_flower_app(tmp_path):
    if importlib.util.find_spec("hatchling") is None:
        pytest.skip("hatchling (the build backend, in the dev extra) is not installed: cannot build the wheel offline")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                           "--no-index", "-q", "-w", str(tmp_path)], env=_env(tmp_path), capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = tmp_path.glob("fedrec-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    app = "fedrec/flower-app/"
    expected = {app + "pyproject.toml"}
    for sub in ("clients", "server"):
        expected |= {f"{app}{sub}/{p.relative_to(ROOT / sub).as_posix()}" for p in (ROOT / sub).rglob("*.py")}
    assert expected <= names
    assert not any("__pycache__" in n for n in names)
    assert not any(n.startswith(("clients/", "server/")) for n in names)  # no top-level `server` in site-packages
    (tmp_path / "bundled.toml").write_bytes(zipfile.ZipFile(wheel).read(app + "pyproject.toml"))
    bundled = load_toml(tmp_path / "bundled.toml")
    flwr_app = bundled["tool"]["flwr"]["app"]
    assert flwr_app["components"] == {"serverapp": "server.app:app", "clientapp": "clients.app:app"}
    assert flwr_app["fab-include"] and bundled["project"]["name"] == "fedrec"
