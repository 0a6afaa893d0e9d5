"""Config inheritance: `base: OTHER.yaml` is merged first; the file states what differs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vlp.config import ConfigError, config_files, load_config, to_dict

REPO = Path(__file__).resolve().parents[1]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_file_overrides_its_base_and_keeps_the_rest(tmp_path):
    _write(tmp_path / "root.yaml", """
model: {name: vlp-tiny-coca}
data: {train_shards: "x/{0..1}.tar"}
train: {steps: 300, lr: 1.0e-3}
objectives: {contrastive: {weight: 1.0}, caption: {weight: 2.0}}
eval:
  shapes: {dataset: a, every_steps: 100}
  retrieval: {dataset: b, every_steps: 100}
""")  # fmt: skip
    _write(tmp_path / "middle.yaml", "base: root.yaml\ntrain: {steps: 50}\n")
    leaf = _write(tmp_path / "leaf.yaml", """
base: middle.yaml
objectives: {caption: {weight: 0.5}}
eval:
  retrieval: null
  long: {dataset: c}
""")  # fmt: skip
    cfg = load_config(leaf)
    assert (cfg.train.steps, cfg.train.lr) == (50, 1.0e-3)
    assert (cfg.objectives.contrastive.weight, cfg.objectives.caption.weight) == (1.0, 0.5)
    assert list(cfg.eval) == ["shapes", "long"] and cfg.eval["shapes"].every_steps == 100
    assert config_files(leaf) == [tmp_path / "root.yaml", tmp_path / "middle.yaml", leaf]


def test_overrides_still_come_last(tmp_path):
    _write(tmp_path / "root.yaml", "data: {train_shards: x.tar}\ntrain: {steps: 300}\n")
    leaf = _write(tmp_path / "leaf.yaml", "base: root.yaml\ntrain: {steps: 50}\n")
    assert load_config(leaf, ["train.steps=7"]).train.steps == 7


CYCLE = {"a.yaml": "base: b.yaml\n", "b.yaml": "base: a.yaml\n"}
BAD_KEY_IN_BASE = {"a.yaml": "base: b.yaml\n", "b.yaml": "train: {stepz: 3}\n"}


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (CYCLE, "a.yaml: base: the configs name each other in a cycle"),
        ({"a.yaml": "base: gone.yaml\n"}, "a.yaml: base: {tmp}/gone.yaml: no such config file"),
        ({"a.yaml": "base: [x]\n"}, "a.yaml: base: must name a config file, got"),
        (BAD_KEY_IN_BASE, "b.yaml: unknown config key 'train.stepz'"),
    ],
)  # fmt: skip
def test_a_bad_base_is_one_error_naming_the_file(tmp_path, files, message):
    for name, text in files.items():
        _write(tmp_path / name, text)
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "a.yaml")
    assert message.format(tmp=tmp_path) in str(err.value)
    assert "\n" not in str(err.value)


def test_the_training_command_reports_a_missing_base_in_one_line(tmp_path):
    config = _write(tmp_path / "a.yaml", "base: gone.yaml\n")
    result = subprocess.run(
        [sys.executable, "vlp/train.py", "--config", str(config)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "gone.yaml: no such config file" in result.stderr
    assert "Traceback" not in result.stderr


def test_every_shipped_config_resolves_and_the_method_configs_extend_a_base():
    extended = {"gap_demo", "protoclip_demo", "protoclip_fashion", "dreamlip_demo",
                "dreamlip_fashion_mosaic", "siglip_demo"}  # fmt: skip
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = to_dict(load_config(path))
        assert cfg["run"]["output_dir"] == f"runs/{path.stem}", path
        assert (len(config_files(path)) > 1) == (path.stem in extended), path


def test_a_base_not_beside_the_file_is_found_among_the_packaged_configs(tmp_path):
    (tmp_path / "mine.yaml").write_text("base: demo.yaml\ntrain:\n  steps: 7\n")
    mine, demo = load_config(tmp_path / "mine.yaml"), load_config(REPO / "configs" / "demo.yaml")
    assert mine.train.steps == 7 and to_dict(mine)["model"] == to_dict(demo)["model"]
    beside = (REPO / "configs" / "demo.yaml").read_text().replace("vlp-demo-clip", "vlp-tiny-clip")
    (tmp_path / "demo.yaml").write_text(beside)  # a base beside the file comes first
    assert load_config(tmp_path / "mine.yaml").model.name == "vlp-tiny-clip"
