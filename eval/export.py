"""`vlp-eval export CHECKPOINT OUT`: a checkpoint in open_clip's hub layout, loadable by path.

OUT holds open_clip_config.json and open_clip_model.safetensors; for a Hugging Face text tower
also the tokenizer's files (open_clip's `local-dir:` loader reads them from OUT itself) and the
tower's folder as OUT/hf_text, which the config names by absolute path. Then
`open_clip.create_model_and_transforms("local-dir:OUT")` builds and loads the model with neither
vlp's configs registered nor the tower's package installed (moving OUT breaks that absolute path:
export again, or edit text_cfg.hf_model_name).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from eval.checkpoints import CheckpointRef, read_meta, resolve_checkpoint
from eval.errors import UsageError
from vlp.runlayout import HF_TEXT_DIR, HUB_WEIGHTS_FILE, OPEN_CLIP_CONFIG_FILE, TOKENIZER_FILES

EXPORT = "export"


def build_export_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{prog} {EXPORT}",
        description="Write a checkpoint as open_clip's hub layout, which open_clip loads with "
        "create_model_and_transforms('local-dir:OUT').",
    )
    parser.add_argument(
        "checkpoint",
        metavar="CHECKPOINT",
        help="a vlp checkpoint directory or a run directory (its latest checkpoint)",
    )
    parser.add_argument("out", metavar="OUT", type=Path, help="a new (or empty) directory")
    return parser


def run_export(args: argparse.Namespace) -> int:
    ref = resolve_checkpoint(Path(args.checkpoint))
    if ref.step is None:
        raise UsageError(f"{args.checkpoint}: a weights file; export needs a vlp checkpoint")
    out: Path = args.out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out}: exists and is not an empty directory; choose a new OUT")
    config, tokenizer_files = _hub_config(ref)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(ref.weights, out / HUB_WEIGHTS_FILE)
    text_cfg = config["model_cfg"].get("text_cfg", {})
    if "hf_model_name" in text_cfg:
        tower = out / HF_TEXT_DIR
        shutil.copytree(Path(text_cfg["hf_model_name"]), tower)
        text_cfg["hf_model_name"] = text_cfg["hf_tokenizer_name"] = str(tower.resolve())
        for file in tokenizer_files:
            shutil.copy2(file, out / file.name)
    (out / OPEN_CLIP_CONFIG_FILE).write_text(json.dumps(config, indent=2))
    print(f"wrote {out}: open_clip.create_model_and_transforms('local-dir:{out}')", file=sys.stderr)
    return 0


def _hub_config(ref: CheckpointRef) -> tuple[dict[str, Any], list[Path]]:
    """The checkpoint's hub config and tokenizer files; for a checkpoint written before vlp
    wrote them, rebuilt from the model config in its meta.json."""
    directory = ref.weights.parent
    if ref.hub_dir is not None:
        config = json.loads((directory / OPEN_CLIP_CONFIG_FILE).read_text())
        hf_folder = config["model_cfg"].get("text_cfg", {}).get("hf_model_name")
        if hf_folder is not None and not Path(hf_folder).is_dir():
            raise UsageError(f"{directory}: its text tower {hf_folder} is gone; reinstall it")
        return config, [p for p in directory.iterdir() if p.name in TOKENIZER_FILES]
    from vlp.config import ModelConfig
    from vlp.model import OpenClipHub, build_model

    model_cfg = ModelConfig(**(read_meta(directory).config.get("model") or {}))
    hub = OpenClipHub.of(model_cfg, build_model(model_cfg)[0].clip)
    return json.loads(json.dumps(hub.config)), list(hub.files)
