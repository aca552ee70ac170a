"""No function in the package is longer than 60 lines (issue 28: a long function is split by its stages)."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "transfusion"
LIMIT = 60


def test_no_function_over_60_lines():
    long = [f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in sorted(PACKAGE.rglob("*.py")) for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= LIMIT]
    assert not long, "split these functions:\n" + "\n".join(long)
