"""The package's layers, bottom to top: no module imports one above its own (function-level imports included).

errors, atomic, models, schedules, images, flops  <  data  <  generation  <  evaluation  <  lightning  <  cli, sweep, quickstart, export, convert
"""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "transfusion"
LAYERS = [("errors", "atomic", "models", "schedules", "images", "flops", "_torchvision_compat"), ("data",),
          ("generation",), ("evaluation",), ("lightning",), ("cli", "sweep", "quickstart", "export", "convert")]
LAYER = {name: level for level, names in enumerate(LAYERS) for name in names}


def _layer(module: str) -> int | None:
    """The layer of ``transfusion.<name>...``; None for the package root and other packages."""
    parts = module.split(".")
    if parts[0] != "transfusion" or len(parts) == 1:
        return None
    assert parts[1] in LAYER, f"transfusion.{parts[1]} is in no layer: add it to LAYERS"
    return LAYER[parts[1]]


def _imports(path: Path) -> list[tuple[str, int]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.module, node.lineno)]
        elif isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
    return found


def test_no_module_imports_a_layer_above_its_own():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(("transfusion",) + path.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")
        own = _layer(name)
        for imported, line in _imports(path):
            level = _layer(imported)
            if own is not None and level is not None and level > own:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({name}) imports {imported}")
    assert not upward, "imports that run upward:\n" + "\n".join(upward)


def test_the_check_sees_an_upward_import(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from transfusion.cli import main\n")
    assert _imports(path) == [("transfusion.cli", 2)] and _layer("transfusion.cli") > _layer("transfusion.data")
