"""Import direction: data_tools -> vlp.data's format and tar index only; vlp -> eval only from
the training loop (vlp/trainer.py); vlp -/-> data_tools, neither imported nor started."""

from __future__ import annotations

import ast
import subprocess
import sys
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


def test_vlp_imports_eval_only_from_the_training_loop():
    for path, names in _imports("vlp").items():
        if path != "vlp/trainer.py":
            assert not any(n == "eval" or n.startswith("eval.") for n in names), path


def test_vlp_neither_imports_nor_starts_data_tools():
    """data_tools imports vlp.data, so a vlp -> data_tools edge would be a cycle; a subprocess
    (`python -m data_tools`) is the same edge hidden from the import graph."""
    for path in (REPO / "vlp").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert not any(a.name.split(".")[0] == "data_tools" for a in node.names), path
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                assert node.module.split(".")[0] != "data_tools", path
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert node.value != "data_tools", f"{path}: starts data_tools?"


def test_the_entry_point_runs_the_installed_package_without_sys_path_edits():
    tree = ast.parse((REPO / "vlp" / "train.py").read_text())
    assert "sys.path" not in ast.unparse(tree)
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert imported == ["vlp.cli"]


def test_an_uninstalled_checkout_says_so_in_one_line():
    """`python -S`: no site-packages, as before `make setup` installed vlp."""
    result = subprocess.run(
        [sys.executable, "-S", "vlp/train.py"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "vlp-train: error: the vlp package is not installed; run `make setup`"
    ]


METHOD_WORDS = ("prototype", "episode", "dreamlip", "siglip", "gap")


def test_the_trainer_names_no_method():
    """Methods plug in through vlp/method.py and the objective contract: the loop's module
    imports only those interfaces and mentions no method, in code, strings or comments."""
    source = (REPO / "vlp" / "trainer.py").read_text().lower()
    for word in METHOD_WORDS:
        assert word not in source, f"vlp/trainer.py mentions {word!r}"
    names = _imports("vlp")["vlp/trainer.py"]
    methods = {"vlp.episodes", "vlp.episode_state", "vlp.prototypes"}
    assert not names & methods
    assert not any(n.startswith("vlp.objectives.") for n in names)
