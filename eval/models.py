"""The model under evaluation: an open_clip model with its own val transform and tokenizer."""

from __future__ import annotations

import contextlib
import difflib
import logging
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.factory import load_state_dict
from safetensors import SafetensorError
from torch import Tensor

from eval.checkpoints import CheckpointRef
from eval.errors import UsageError
from vlp.model import register_model_configs
from vlp.openclip_compat import can_trim_text, clip_text

PRECISIONS: dict[str, torch.dtype | None] = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
"""Autocast dtype per --precision; fp32 runs without autocast."""


@dataclass
class EvalModel:
    """A CLIP-like `module` (encode_image / encode_text) ready for inference on `device`.

    Build one with `load_model` from a checkpoint, or directly from a model in memory (the
    training loop does: `EvalModel(model, preprocess_val, tokenizer, name, device=...)`, with
    the model in eval mode while it evaluates).
    """

    module: torch.nn.Module
    preprocess: Callable
    """PIL image -> (3, H, W) tensor: the model's own open_clip val transform."""
    tokenizer: Callable[[list[str]], Tensor]
    name: str
    pretrained: str = ""
    """Where the weights came from (a file path), as clip_benchmark's `pretrained` field."""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "fp32"
    step: int | None = None

    def encode_images(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) preprocessed images -> (B, D) L2-normalised float32 on the CPU."""
        with self._inference():
            features = self.module.encode_image(images.to(self.device))
        return F.normalize(features.float(), dim=-1).cpu()

    def encode_tokens(self, tokens: Tensor) -> Tensor:
        """(B, L) tokens -> (B, D) L2-normalised float32 on the CPU.

        For models whose text output at the end-of-text token depends only on the tokens up
        to it (causal mask, EOT pooling), trailing padding is cut off first: the same
        embeddings for a fraction of the work on short captions.
        """
        with self._inference():
            if self._trims_text():
                length = int(prefix_lengths(tokens).max())
                features = clip_text(self.module, tokens[:, :length].to(self.device))
            else:
                features = self.module.encode_text(tokens.to(self.device))
        return F.normalize(features.float(), dim=-1).cpu()

    def text_lengths(self, tokens: Tensor) -> Tensor:
        """(B,) how many tokens of each row the text tower processes."""
        if self._trims_text():
            return prefix_lengths(tokens)
        return torch.full((tokens.shape[0],), tokens.shape[1])

    def _trims_text(self) -> bool:
        return can_trim_text(self.module, pools=("argmax",))  # prefix_lengths cut at argmax

    @contextlib.contextmanager
    def _inference(self) -> Iterator[None]:
        dtype = PRECISIONS[self.precision]
        with (
            torch.inference_mode(),
            torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None),
        ):
            yield


def prefix_lengths(tokens: Tensor) -> Tensor:
    """(B, L) CLIP tokens -> (B,) number of tokens up to and including end-of-text.

    open_clip's tokenizers give the end-of-text token the highest id in the row (what
    open_clip's own argmax pooling relies on).
    """
    return tokens.argmax(dim=-1) + 1


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(ref: CheckpointRef, device: str | None = None, precision: str = "fp32") -> EvalModel:
    """Build `ref.model_name`, load `ref.weights` and put the model in eval mode on `device`."""
    register_model_configs()
    check_model_name(ref.model_name)
    target = _device(device or default_device())
    # a checkpoint's hub config builds what a name cannot (a Hugging Face text tower)
    source = ref.model_name if ref.hub_dir is None else f"local-dir:{ref.hub_dir}"
    with _quiet_open_clip():
        module, _, preprocess = open_clip.create_model_and_transforms(source)
    load_weights(module, ref.weights, ref.model_name)
    module.to(target).eval()
    return EvalModel(
        module=module,
        preprocess=preprocess,
        tokenizer=open_clip.get_tokenizer(source),
        name=ref.model_name,
        pretrained=str(ref.weights),
        device=target,
        precision=precision,
        step=ref.step,
    )


def check_model_name(name: str) -> None:
    """A usage error listing close matches when open_clip does not know `name`."""
    if ":" in name:  # hf-hub:ORG/REPO or local-dir:PATH; open_clip resolves those itself
        return
    known = open_clip.list_models()
    if name in known:
        return
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    hint = f"close matches: {', '.join(close)}" if close else "see open_clip.list_models()"
    raise UsageError(f"unknown model {name!r}; {hint} (vlp's own: configs/models/*.json)")


def load_weights(module: torch.nn.Module, weights: Path, model_name: str) -> None:
    """Load an open_clip weights file into `module`; a usage error naming what does not fit.

    vlp checkpoints carry open_clip's own names and shapes and load directly; anything else
    goes through open_clip's converting loader (older open_clip layouts, third-party formats).
    """
    try:
        state = load_state_dict(str(weights))
    except _UNREADABLE as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UsageError(f"{weights}: not a weights file open_clip can read ({reason})") from err
    problem = _incompatibility(module, state)
    if problem is None:
        module.load_state_dict(state)
        return
    try:
        incompatible = open_clip.load_checkpoint(module, str(weights), strict=False)
    # open_clip signals some shape mismatches with assert (e.g. a text width change)
    except (RuntimeError, ValueError, KeyError, AssertionError) as err:
        raise UsageError(_mismatch_message(weights, model_name, problem)) from err
    if incompatible.missing_keys or incompatible.unexpected_keys:
        raise UsageError(_mismatch_message(weights, model_name, problem))


_UNREADABLE = (RuntimeError, ValueError, OSError, EOFError, pickle.UnpicklingError, SafetensorError)
"""What torch.load and safetensors raise for a file that is not a state dict."""


def _incompatibility(module: torch.nn.Module, state: dict[str, Tensor]) -> str | None:
    """What keeps `state` from loading into `module` as it is, or None."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    reshaped = sorted(k for k in expected.keys() & found.keys() if expected[k] != found[k])
    parts = []
    if reshaped:
        k = reshaped[0]
        parts.append(
            f"{len(reshaped)} tensors of other shapes (e.g. {k}: {found[k]} in the file, "
            f"{expected[k]} in the model)"
        )
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    return ", ".join(parts) or None


def _mismatch_message(weights: Path, model_name: str, problem: str) -> str:
    return (
        f"{weights} does not fit model {model_name!r}: {problem}; "
        "pass the --model these weights were trained as"
    )


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UsageError(f"--device {name}: not a torch device ({err})") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available here; use --device cpu")
    return device


@contextlib.contextmanager
def _quiet_open_clip() -> Iterator[None]:
    """Silence open_clip's "initialized randomly" warning: the weights are loaded next."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)
