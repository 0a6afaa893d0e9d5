"""Settings shared by every evaluator (the CLI's flags, or the training loop's eval config)."""

from __future__ import annotations

from dataclasses import dataclass, field

from vlp.config import GenerationConfig, ProbeConfig

RECALL_KS = (1, 5, 10)


@dataclass(frozen=True)
class EvalOptions:
    batch_size: int = 256
    """Images per forward pass (texts are batched by token count, eval.encode)."""
    workers: int = 1
    """DataLoader processes decoding images; 0 decodes in the main process."""
    recall_ks: tuple[int, ...] = RECALL_KS
    retrieval_method: str = "auto"
    """exact | faiss | faiss-ivf | auto (see eval.retrieval.choose_method)."""
    faiss_threshold: int = 1_000_000
    """auto: galleries at least this large go to faiss's IVF index instead of exact scores."""
    embeddings_dir: str | None = None
    """retrieval: stream image and caption embeddings to memory-mapped .npy files here
    (eval.embedding_store) instead of holding them in RAM."""
    seed: int = 0
    """Seeds the linear-separability split and classifier, and the linear probe."""
    caption: GenerationConfig = field(default_factory=GenerationConfig)
    """captioning: how captions are generated (vlp.generate)."""
    meteor: bool = False
    """captioning: also score METEOR (its Java scorer takes about half a minute to start)."""
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    """linear_probe: clip_benchmark's protocol settings."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if not self.recall_ks or min(self.recall_ks) < 1:
            raise ValueError(f"recall_ks must be positive, got {self.recall_ks}")
        for section, checks in (
            ("caption", self.caption.checks()),
            ("probe", self.probe.checks()),
        ):
            for ok, key, expected in checks:
                if not ok:
                    value = getattr(getattr(self, section), key)
                    raise ValueError(f"{section}.{key} must be {expected}, got {value}")
