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

from typing import Any

from torch import Tensor

from vlp import episodes  # noqa: F401  (registers the `episodes` method the terms need)
from vlp.episode_state import EpisodeState
from vlp.objectives import OBJECTIVES, Objective
from vlp.prototypes import crosswise_loss, prototype_targets


class _EpisodicTerm(Objective):
    """Holds the current episode's state; None switches the term off."""

    method = "episodes"  # vlp/episodes.py: EpisodeRunner

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.episode: EpisodeState | None = None

    def set_state(self, state: EpisodeState | None) -> None:
        self.episode = state


@OBJECTIVES.register("prototype")
class PrototypeObjective(_EpisodicTerm):
    def __call__(self, out: Any, batch: Any) -> Tensor | None:
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
    def __call__(self, out: Any, batch: Any) -> Tensor | None:
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
