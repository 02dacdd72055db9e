# Copyright (c) kd_detr contributors.
"""RegionCLIP-style region-concept alignment (Zhong et al., CVPR 2022).

A frozen CLIP teacher scores regions against a pool of concept text embeddings
(``softmax(cos / T)``, T = 0.01); regions whose top concept probability exceeds a threshold
(0.1) get that concept as a pseudo label. When no region passes, both losses are 0 (RegionCLIP
then keeps every region instead). The student learns from them with two losses:

* a contrastive region-concept loss: every kept region is scored against the pseudo-label
  concept embeddings of all kept regions (cosine / T) and the softmax mass on the columns that
  share its label is maximised (RegionCLIP's multi-instance cross-entropy; with distinct labels
  it is the plain cross-entropy over the batch's concepts);
* a distillation loss: KL(teacher || student) between the two region-concept distributions over
  the whole concept pool, averaged over the kept regions.
"""
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable

from ..utils import expand_data_path
from .text_embeddings import load_text_embeddings

__all__ = [
    "PseudoRegionLabels",
    "RegionConceptAlignment",
    "region_concept_contrastive_loss",
    "region_concept_distillation_loss",
    "region_concept_logits",
    "pseudo_region_labels",
]

RegionsLike = Union[torch.Tensor, Callable[[], torch.Tensor]]


@dataclass
class PseudoRegionLabels:
    """Teacher pseudo labels of N regions over K concepts.

    Attributes:
        probs: (N, K) teacher concept distribution ``softmax(cos / T)`` of every region.
        scores: (N,) top concept probability.
        labels: (N,) top concept index (kept or not).
        keep: (N,) bool, regions whose top probability exceeds the threshold.
    """

    probs: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    keep: torch.Tensor

    @property
    def kept_labels(self) -> torch.Tensor:
        """(M,) pseudo labels of the kept regions."""
        return self.labels[self.keep]


def _check_dims(regions: torch.Tensor, concepts: torch.Tensor, what: str) -> None:
    if regions.dim() != 2 or concepts.dim() != 2 or regions.shape[1] != concepts.shape[1]:
        raise ValueError(
            f"{what}: region embeddings must be (N, D) and concept embeddings (K, D) with the same "
            f"D, got {tuple(regions.shape)} and {tuple(concepts.shape)}; embed regions and "
            "concepts with the same CLIP model"
        )


def region_concept_logits(
    regions: torch.Tensor, concepts: torch.Tensor, temperature: float = 0.01
) -> torch.Tensor:
    """(N, K) cosine similarity of (N, D) region and (K, D) concept embeddings / temperature."""
    _check_dims(regions, concepts, "region_concept_logits")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return F.normalize(regions, dim=-1) @ F.normalize(concepts, dim=-1).t() / temperature


@torch.no_grad()
def pseudo_region_labels(
    teacher_regions: RegionsLike,
    concepts: torch.Tensor,
    temperature: float = 0.01,
    threshold: float = 0.1,
) -> PseudoRegionLabels:
    """Pseudo concept labels of regions from a CLIP teacher (no gradients).

    Args:
        teacher_regions: (N, D) teacher region embeddings (e.g. CLIP image embeddings of region
            crops), or a callable returning them (called under ``torch.no_grad``).
        concepts: (K, D) concept text embeddings.
        temperature: of the teacher's softmax over concepts (RegionCLIP: 0.01).
        threshold: a region is kept when its top probability is > this (RegionCLIP: 0.1).

    Returns:
        :class:`PseudoRegionLabels`; ``keep`` may be all False.
    """
    regions = teacher_regions() if callable(teacher_regions) else teacher_regions
    probs = region_concept_logits(regions.float(), concepts.float(), temperature).softmax(-1)
    scores, labels = probs.max(dim=-1)
    return PseudoRegionLabels(probs=probs, scores=scores, labels=labels, keep=scores > threshold)


def region_concept_contrastive_loss(
    regions: torch.Tensor,
    concepts: torch.Tensor,
    pseudo: PseudoRegionLabels,
    temperature: float = 0.01,
) -> torch.Tensor:
    """Multi-instance contrastive loss between kept student regions and pseudo-label concepts.

    With M kept regions, ``S[i, j] = cos(r_i, t_{y_j}) / T`` (M x M: the concept of each kept
    region's label) and ``loss = mean_i -log(sum_{j: y_j = y_i} softmax_j(S[i]))``.

    Args:
        regions: (N, D) student region embeddings (all N regions; the kept ones are used).
        concepts: (K, D) concept embeddings of the student's text side.
        pseudo: teacher pseudo labels of the N regions.
        temperature: logit temperature (RegionCLIP: 0.01).

    Returns:
        Scalar; 0 (connected to ``regions``' graph) when no region is kept.
    """
    _check_dims(regions, concepts, "region_concept_contrastive_loss")
    if pseudo.keep.numel() != regions.shape[0]:
        raise ValueError(
            f"{regions.shape[0]} student regions but {pseudo.keep.numel()} pseudo-labelled ones"
        )
    if not bool(pseudo.keep.any()):
        return regions.sum() * 0.0
    labels = pseudo.kept_labels
    logits = region_concept_logits(regions[pseudo.keep], concepts[labels], temperature)
    positive = labels[:, None] == labels[None, :]
    log_probs = logits.log_softmax(dim=-1)
    return -torch.logsumexp(log_probs.masked_fill(~positive, float("-inf")), dim=-1).mean()


def region_concept_distillation_loss(
    regions: torch.Tensor,
    concepts: torch.Tensor,
    pseudo: PseudoRegionLabels,
    temperature: float = 0.01,
    kept_only: bool = True,
) -> torch.Tensor:
    """KL(teacher || student) of the region-concept distributions, mean over regions.

    Args:
        regions: (N, D) student region embeddings.
        concepts: (K, D) concept embeddings (same pool and order as the teacher's).
        pseudo: teacher pseudo labels (``probs`` is the target).
        temperature: of the student's softmax (RegionCLIP: 0.01, as the teacher's).
        kept_only: distil the kept regions only (RegionCLIP), else all regions.

    Returns:
        Scalar ``sum_k p_t log(p_t / p_s)`` averaged over regions; 0 (connected to the graph)
        when no region is used.
    """
    _check_dims(regions, concepts, "region_concept_distillation_loss")
    if pseudo.probs.shape != (regions.shape[0], concepts.shape[0]):
        raise ValueError(
            f"Teacher probabilities {tuple(pseudo.probs.shape)} do not match (regions, concepts) "
            f"= ({regions.shape[0]}, {concepts.shape[0]}): use the same concept pool for both"
        )
    use = pseudo.keep if kept_only else torch.ones_like(pseudo.keep)
    if not bool(use.any()):
        return regions.sum() * 0.0
    log_student = region_concept_logits(regions[use], concepts, temperature).log_softmax(-1)
    return F.kl_div(log_student, pseudo.probs[use].to(log_student), reduction="batchmean")


class RegionConceptAlignment(nn.Module):
    """Both RegionCLIP alignment losses over a fixed concept pool (``MODEL.OV.REGIONCLIP``).

    The concept embeddings are a non-persistent buffer (not in checkpoints, no gradient).
    """

    @configurable
    def __init__(
        self,
        concepts: torch.Tensor,
        *,
        temperature: float = 0.01,
        threshold: float = 0.1,
        contrastive_weight: float = 1.0,
        distill_weight: float = 1.0,
    ):
        """
        Args:
            concepts: (K, D) concept text embeddings (L2-normalised here).
            temperature: teacher and student temperature.
            threshold: pseudo-label threshold on the teacher's top probability.
            contrastive_weight, distill_weight: loss multipliers.
        """
        super().__init__()
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        self.register_buffer("concepts", F.normalize(concepts.float(), dim=-1), persistent=False)
        self.temperature = float(temperature)
        self.threshold = float(threshold)
        self.contrastive_weight = float(contrastive_weight)
        self.distill_weight = float(distill_weight)

    @classmethod
    def from_config(cls, cfg, concepts: Optional[torch.Tensor] = None):
        rc = cfg.MODEL.OV.REGIONCLIP
        if concepts is None:
            path = expand_data_path(rc.CONCEPT_EMBEDDINGS)
            if not path:
                raise ValueError("Set MODEL.OV.REGIONCLIP.CONCEPT_EMBEDDINGS (a (K, D) file)")
            concepts = load_text_embeddings(path, expected_dim=cfg.MODEL.OV.EMBED_DIM)
        return {
            "concepts": concepts,
            "temperature": rc.TEMPERATURE,
            "threshold": rc.CONCEPT_THRESHOLD,
            "contrastive_weight": rc.CONTRASTIVE_WEIGHT,
            "distill_weight": rc.DISTILL_WEIGHT,
        }

    def forward(
        self, student_regions: torch.Tensor, teacher_regions: RegionsLike
    ) -> Dict[str, torch.Tensor]:
        """
        Args:
            student_regions: (N, D) student region embeddings (already projected to D).
            teacher_regions: (N, D) teacher region embeddings or a callable returning them.

        Returns:
            {"loss_regionclip_contrastive", "loss_regionclip_distill"} (weighted scalars).
        """
        pseudo = pseudo_region_labels(
            teacher_regions, self.concepts, self.temperature, self.threshold
        )
        contrastive = region_concept_contrastive_loss(
            student_regions, self.concepts, pseudo, self.temperature
        )
        distill = region_concept_distillation_loss(
            student_regions, self.concepts, pseudo, self.temperature
        )
        return {
            "loss_regionclip_contrastive": self.contrastive_weight * contrastive,
            "loss_regionclip_distill": self.distill_weight * distill,
        }
