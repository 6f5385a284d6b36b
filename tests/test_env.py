"""python/vtattn/_env.py is the one table of VTATTN_* environment variables: every variable the tree
reads is in it, Python reads them only through it, and `python -m vtattn info` prints them."""
import re
from pathlib import Path

import pytest

from vtattn import _env

ROOT = Path(__file__).resolve().parents[1]
NAME = re.compile(r"(?<![A-Za-z0-9_])VTATTN_[A-Z0-9][A-Z0-9_]*")
# Where variables are read or documented; csrc/ holds C++ macros of the same prefix, not variables.
SCANNED = ("python", "triton_kernels", "scripts", "tests", "benchmarks", "docs", "setup.py", "README.md",
           "CONTRIBUTING.md")
SUFFIXES = (".py", ".sh", ".md", ".toml")
READ = re.compile(r"(os\.environ\.get|os\.getenv|os\.environ\[)\(?\s*[\"']VTATTN_")


def _files():
    for entry in SCANNED:
        path = ROOT / entry
        for f in [path] if path.is_file() else sorted(path.rglob("*")) if path.is_dir() else []:
            if f.suffix in SUFFIXES and f.is_file() and "__pycache__" not in f.parts:
                yield f


def _macros():
    return {m for f in (ROOT / "csrc").rglob("*") if f.is_file() for m in NAME.findall(f.read_text())}


def test_every_variable_in_the_tree_is_in_the_table():
    setup_macros = {"VTATTN_WITH_CUDA", "VTATTN_BUILD_INFO"}  # setup.py passes these to the compiler
    found = {}
    for f in _files():
        for name in NAME.findall(f.read_text(errors="replace")):
            found.setdefault(name, f.relative_to(ROOT))
    unknown = {n: str(f) for n, f in found.items() if n not in _env.VARS and n not in _macros() | setup_macros}
    assert not unknown, f"add these to python/vtattn/_env.py (name: first file): {unknown}"


def test_python_reads_variables_only_through_env():
    readers = [f"{f.relative_to(ROOT)}:{i}" for f in _files() if f.suffix == ".py" and f.name != "_env.py"
               for i, line in enumerate(f.read_text().splitlines(), 1) if READ.search(line)]
    assert not readers, f"read these through vtattn._env (get / flag / integer): {readers}"


def test_values_defaults_and_unknown_names(monkeypatch):
    monkeypatch.delenv("VTATTN_STRICT", raising=False)
    assert _env.get("VTATTN_STRICT") == "0" and not _env.flag("VTATTN_STRICT")
    monkeypatch.setenv("VTATTN_STRICT", "yes")
    assert _env.flag("VTATTN_STRICT")
    monkeypatch.setenv("VTATTN_TRITON_CONFIG", "3")
    assert _env.integer("VTATTN_TRITON_CONFIG") == 3
    monkeypatch.setenv("VTATTN_TRITON_CONFIG", "x")
    with pytest.raises(ValueError, match="VTATTN_TRITON_CONFIG must be an integer"):
        _env.integer("VTATTN_TRITON_CONFIG")
    with pytest.raises(KeyError, match="not a vtattn environment variable"):
        _env.get("VTATTN" + "_STRIKT")  # split: the scan above must not find the misspelling


def test_info_prints_every_variable(monkeypatch, capsys):
    from vtattn import __main__, _info
    monkeypatch.setattr(_info, "info", lambda: {"vtattn": "x", "backends": {}, "build": {},
                                                "environment": _env.table()})
    monkeypatch.setenv("VTATTN_BACKEND", "torch")
    __main__.main(["info"])
    out = capsys.readouterr().out.split("environment (python/vtattn/_env.py):\n", 1)[1]
    for name in _env.VARS:
        assert re.search(rf"^  {name} +\S", out, re.M), name
    assert re.search(r"^  VTATTN_BACKEND +'torch' \(set\); read by vtattn: force one backend", out, re.M)
