"""Import direction: data_tools -> vlp.data's format and tar index only; vlp -/-> eval."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _imports(package: str) -> dict[str, set[str]]:
    found = {}
    for path in (REPO / package).rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        found[str(path.relative_to(REPO))] = names
    return found


def test_data_tools_depends_only_on_the_shard_format():
    for path, names in _imports("data_tools").items():
        from_vlp = {n for n in names if n == "vlp" or n.startswith("vlp.")}
        assert from_vlp <= {"vlp", "vlp.data", "vlp.data.format", "vlp.data.shards"}, path
        assert not any(n == "eval" or n.startswith("eval.") for n in names), path


def test_vlp_imports_eval_only_from_the_training_entry_point():
    for path, names in _imports("vlp").items():
        if path != "vlp/train.py":
            assert not any(n == "eval" or n.startswith("eval.") for n in names), path
