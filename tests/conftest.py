"""Shared test helpers: import an example script by path, isolate its constants, run it as a user.

The example folders are not Python packages (students run each script from its own folder), so
tests load a script from its file. Each helper here is used by more than one test module.
"""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
_LOADED: dict[str, ModuleType] = {}


def load_script(relative_path: str) -> ModuleType:
    """Import the script at REPO_ROOT/relative_path once per test session and return the module."""
    if relative_path not in _LOADED:
        path = REPO_ROOT / relative_path
        name = path.stem
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses and pickling look the module up by name
        spec.loader.exec_module(module)
        _LOADED[relative_path] = module
    return _LOADED[relative_path]


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """Return isolate(module, **overrides): make a script module safe to run inside one test.

    Every UPPERCASE constant is restored after the test (main(["--quick"]) rewrites some of them),
    OUTPUT_DIR points into tmp_path so a user's outputs/ is never touched, and the keyword
    overrides are applied on top (a misspelt name fails loudly instead of being ignored).
    """

    def isolate(module: ModuleType, **overrides) -> ModuleType:
        for name in list(vars(module)):
            if name.isupper():
                monkeypatch.setattr(module, name, getattr(module, name))
        monkeypatch.setattr(module, "OUTPUT_DIR", tmp_path / "outputs")
        for name, value in overrides.items():
            assert hasattr(module, name), f"{module.__name__} has no constant {name}"
            monkeypatch.setattr(module, name, value)
        return module

    return isolate


def run_script(relative_path: str, args: list[str], tmp_path: Path, timeout: float = 600):
    """Run an example as a user does: `python script.py ARGS` from the script's own folder.

    The script is copied into tmp_path/<its folder>/ first, so everything it writes beside itself
    (outputs/, data/) stays under tmp_path. Returns the CompletedProcess (text mode).
    """
    source = REPO_ROOT / relative_path
    folder = tmp_path / source.parent.name
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, folder / source.name)
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, source.name, *args],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
