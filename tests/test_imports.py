"""What importing the package does: ``import transfusion`` and its pure-PyTorch parts set no environment variable
and leave torchvision alone; every module that imports lightning, torchmetrics, torchvision, diffusers or
transformers is reached through the torchvision shim (``transfusion/_torchvision_compat.py``), so it imports in a
fresh interpreter next to a CPU torch; only the ``transfusion`` command sets ``OMP_WAIT_POLICY``."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "transfusion"
SHIMMED = ("data", "evaluation", "lightning", "sweep")  # packages whose __init__ runs the shim
NEEDS_SHIM = ("lightning", "torchmetrics", "torchvision", "torch_fidelity", "diffusers", "transformers")
LIGHTNING_SETS = "PYTORCH_NVML_BASED_CUDA_CHECK"  # lightning/fabric/__init__.py sets it
PURE = ("transfusion.models.transfusion", "transfusion.models.chameleon", "transfusion.generation",
        "transfusion.schedules", "transfusion.images", "transfusion.flops")

FRESH = f"""
import json, os, sys
before = dict(os.environ)
steps = {{}}

def state():
    changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))
    heavy = sorted(m for m in ("torch", "torchvision", "lightning", "torchmetrics") if m in sys.modules)
    return {{"changed": changed, "imported": heavy}}

import transfusion
steps["transfusion"] = state()
for name in {PURE!r}:
    __import__(name)
steps["pure"] = state()
import transfusion.lightning.transfusion  # lightning -> torchmetrics -> torchvision, first in this process
steps["lightning"] = state()
import transfusion.cli
steps["cli"] = state()
steps["omp"] = os.environ.get("OMP_WAIT_POLICY")
print(json.dumps(steps))
"""


@pytest.mark.slow
def test_imports_in_a_fresh_interpreter():
    # neither variable may come from this process (conftest set one; lightning, imported here by earlier tests, the other)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", LIGHTNING_SETS)}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", FRESH], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    steps = json.loads(out.stdout.strip().splitlines()[-1])
    assert steps["transfusion"] == {"changed": [], "imported": []}  # nothing, not even torch
    assert steps["pure"] == {"changed": [], "imported": ["torch"]}  # the models need torch only
    # the LightningModules import (the shim ran) and set nothing but what lightning.fabric sets on import
    assert steps["lightning"]["changed"] == [LIGHTNING_SETS]
    assert {"lightning", "torchvision"} <= set(steps["lightning"]["imported"])
    assert steps["cli"]["changed"] == ["OMP_WAIT_POLICY", LIGHTNING_SETS] and steps["omp"] == "PASSIVE"  # the command


def _module_name(path: Path) -> str:
    return ".".join(("transfusion",) + path.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")


def _calls_shim(tree: ast.AST) -> list[int]:
    return [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Call)
            and getattr(node.func, "id", None) == "ensure_torchvision_importable"]


def test_every_import_of_torchvision_users_is_behind_the_shim():
    """Outside the shimmed packages, an import of lightning, torchvision, ... follows a call of the shim in the same
    file (``cli.py``, the lazy ``import diffusers``); the shimmed packages call it in their ``__init__``."""
    for package in SHIMMED:
        assert _calls_shim(ast.parse((PACKAGE / package / "__init__.py").read_text())), package
    assert not _calls_shim(ast.parse((PACKAGE / "__init__.py").read_text()))
    unguarded = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        if (name.split(".") + [""])[1] in SHIMMED or name == "transfusion._torchvision_compat":
            continue
        tree = ast.parse(path.read_text())
        first_call = min(_calls_shim(tree), default=float("inf"))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            if any(n.split(".")[0] in NEEDS_SHIM for n in names) and node.lineno < first_call:
                unguarded.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {names[0]}")
    assert not unguarded, "imports not behind the torchvision shim:\n" + "\n".join(unguarded)
