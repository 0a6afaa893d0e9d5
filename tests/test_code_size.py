"""Size limits of the product code (vlp/, eval/, data_tools/; tests and bench excluded): no
module over 400 lines, no function over 60. A module past the limit is split where its parts
have their own reason to change; a function, where it does two things."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("vlp", "eval", "data_tools")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def _modules() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (REPO / package).rglob("*.py"))


def test_the_limits_see_every_package():
    assert {p.relative_to(REPO).parts[0] for p in _modules()} == set(PACKAGES)


def test_no_module_is_over_400_lines():
    sizes = {p: len(p.read_text().splitlines()) for p in _modules()}
    over = [f"{p.relative_to(REPO)}: {n}" for p, n in sizes.items() if n > MAX_MODULE_LINES]
    assert not over, f"modules over {MAX_MODULE_LINES} lines: {', '.join(over)}"


def test_no_function_is_over_60_lines():
    over = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    over.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {lines}")
    assert not over, f"functions over {MAX_FUNCTION_LINES} lines: {', '.join(over)}"
