# Copyright (c) kd_detr contributors.
"""Region-text classifier: region features scored against fixed class text embeddings.

Covers the three classifier styles of ViLD, RegionCLIP and Detic: a learned projection to the
text space, cosine similarity over a temperature, and a learned / zero / no background logit.
"""
import json
from typing import Dict, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.layers import ShapeSpec

from .text_embeddings import load_text_embeddings

__all__ = ["RegionTextClassifier", "federated_classes", "load_class_freq_weight"]

BACKGROUND_MODES = ("learned", "zero", "none")


def load_class_freq_weight(cat_info, power: float = 0.5, zero_rare: bool = True) -> torch.Tensor:
    """Federated-loss class weights ``image_count ** power`` in category-id order.

    Args:
        cat_info: path of an LVIS-style cat_info json, or its list of categories (with "id",
            "image_count" and optionally "frequency").
        power: exponent of the image counts (Detic: 0.5).
        zero_rare: zero the weight of rare ("r") classes, which the open-vocabulary setting
            treats as unseen (Detic#79: Detic's cat_info still holds their counts).

    Returns:
        (C,) float32 tensor.
    """
    if isinstance(cat_info, str):
        with open(cat_info) as f:
            cat_info = json.load(f)
    cats = sorted(cat_info, key=lambda c: c["id"])
    counts = torch.tensor([float(c["image_count"]) for c in cats])
    if zero_rare:
        rare = torch.tensor([c.get("frequency") == "r" for c in cats])
        counts[rare] = 0.0
    return counts.pow(power)


def federated_classes(
    gt_classes: torch.Tensor,
    freq_weight: torch.Tensor,
    num_sample: int,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Classes of one federated-loss iteration (Detic).

    Args:
        gt_classes: (N,) ground-truth class ids of the batch; ids >= C (background) are ignored.
        freq_weight: (C,) sampling weights (e.g. ``image_count ** 0.5``); zero never samples.
        num_sample: classes per iteration; all GT classes are kept even when more.
        generator: random generator for the negative classes.

    Returns:
        (K,) sorted unique class ids: the GT classes plus ``num_sample - #GT`` negatives drawn
        without replacement in proportion to ``freq_weight`` (fewer when fewer have weight > 0).
    """
    num_classes = freq_weight.numel()
    gt = torch.unique(gt_classes[gt_classes < num_classes]).to(freq_weight.device)
    num_neg = num_sample - gt.numel()
    if num_neg <= 0:
        return gt
    prob = freq_weight.detach().float().clone()
    prob[gt] = 0.0
    num_neg = min(num_neg, int((prob > 0).sum()))
    if num_neg == 0:
        return gt
    neg = torch.multinomial(prob, num_neg, replacement=False, generator=generator)
    return torch.sort(torch.cat([gt, neg]))[0]


class RegionTextClassifier(nn.Module):
    """Cosine classifier over a swappable vocabulary of text embeddings.

    ``logits[:, c] = cos(normalize(W x), t_c) / temperature`` for the C classes, plus a last
    background column: ``cos(normalize(W x), normalize(b)) / temperature`` for a learnable ``b``
    ("learned", ViLD), a constant 0 ("zero": a fixed zero embedding as in RegionCLIP and Detic,
    whose cosine is defined as 0), or none ("none": sigmoid classification, Detic's fed loss).

    The vocabulary is a non-persistent buffer: it is not in ``state_dict`` and can be swapped
    with :meth:`set_vocabulary`; a separate test vocabulary is used in eval mode when set.
    """

    @configurable
    def __init__(
        self,
        input_dim: int,
        text_embeddings: torch.Tensor,
        *,
        test_text_embeddings: Optional[torch.Tensor] = None,
        temperature: float = 0.01,
        background: str = "learned",
        bias_init: Optional[float] = None,
        loss: str = "softmax",
        bg_loss_weight: float = 1.0,
        use_fed_loss: bool = False,
        fed_loss_num_classes: int = 50,
        fed_loss_freq_weight: Optional[torch.Tensor] = None,
    ):
        """
        Args:
            input_dim: region feature size D_in.
            text_embeddings: (C, D) training vocabulary (rows are L2-normalised here).
            test_text_embeddings: (C', D) vocabulary for eval mode (None: the training one).
            temperature: logits are cosine / temperature (ViLD, RegionCLIP 0.01; Detic 0.02).
            background: "learned", "zero" or "none".
            bias_init: initial value of a learnable scalar added to the class logits (None: no
                bias; Detic uses -4.6 = logit(0.01) with sigmoid).
            loss: "softmax" (C + 1 way cross-entropy; needs a background) or "sigmoid".
            bg_loss_weight: softmax cross-entropy weight of the background class.
            use_fed_loss: sigmoid only: binary CE over :func:`federated_classes` only.
            fed_loss_num_classes: classes per iteration of the federated loss.
            fed_loss_freq_weight: (C,) sampling weights of the federated loss.
        """
        super().__init__()
        if background not in BACKGROUND_MODES:
            raise ValueError(f"background must be one of {BACKGROUND_MODES}, got {background!r}")
        if loss not in ("softmax", "sigmoid"):
            raise ValueError(f"loss must be 'softmax' or 'sigmoid', got {loss!r}")
        if loss == "softmax" and background == "none":
            raise ValueError("Softmax cross-entropy needs a background logit ('learned' or 'zero')")
        if use_fed_loss and (loss != "sigmoid" or fed_loss_freq_weight is None):
            raise ValueError("The federated loss needs loss='sigmoid' and fed_loss_freq_weight")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        text_dim = text_embeddings.shape[1]
        self.temperature = float(temperature)
        self.background = background
        self.loss_type = loss
        self.bg_loss_weight = float(bg_loss_weight)
        self.use_fed_loss = use_fed_loss
        self.fed_loss_num_classes = int(fed_loss_num_classes)
        self.proj = nn.Linear(input_dim, text_dim)
        self.bg_embedding = None
        if background == "learned":
            self.bg_embedding = nn.Parameter(torch.randn(text_dim) * 0.01)
        self.bias = None if bias_init is None else nn.Parameter(torch.tensor(float(bias_init)))
        self.register_buffer("fed_loss_freq_weight", fed_loss_freq_weight, persistent=False)
        self.register_buffer("train_vocabulary", torch.empty(0, text_dim), persistent=False)
        self.register_buffer("test_vocabulary", None, persistent=False)
        self.set_vocabulary(text_embeddings)
        if test_text_embeddings is not None:
            self.set_vocabulary(test_text_embeddings, split="test")

    @classmethod
    def from_config(cls, cfg, input_shape: Union[int, ShapeSpec]):
        ov = cfg.MODEL.OV
        if isinstance(input_shape, ShapeSpec):
            dims = [input_shape.channels, input_shape.width or 1, input_shape.height or 1]
            input_dim = dims[0] * dims[1] * dims[2]
        else:
            input_dim = int(input_shape)
        test = None
        if ov.TEST_TEXT_EMBEDDINGS:
            test = load_text_embeddings(ov.TEST_TEXT_EMBEDDINGS, expected_dim=ov.EMBED_DIM)
        freq = None
        if ov.USE_FED_LOSS:
            freq = load_class_freq_weight(
                ov.CAT_FREQ_PATH, ov.FED_LOSS_FREQ_WEIGHT_POWER, ov.FED_LOSS_ZERO_RARE
            )
        return {
            "input_dim": input_dim,
            "text_embeddings": load_text_embeddings(ov.TEXT_EMBEDDINGS, expected_dim=ov.EMBED_DIM),
            "test_text_embeddings": test,
            "temperature": ov.TEMPERATURE,
            "background": ov.BACKGROUND,
            "bias_init": ov.BIAS_INIT,
            "loss": ov.LOSS,
            "bg_loss_weight": ov.BG_LOSS_WEIGHT,
            "use_fed_loss": ov.USE_FED_LOSS,
            "fed_loss_num_classes": ov.FED_LOSS_NUM_CLASSES,
            "fed_loss_freq_weight": freq,
        }

    def set_vocabulary(self, embeddings: torch.Tensor, split: Optional[str] = None) -> None:
        """Swap the class vocabulary; parameters are unchanged and the output width follows.

        Args:
            embeddings: (C, D) text embeddings (L2-normalised here).
            split: None sets the vocabulary of both modes (dropping a separate test one);
                "train" or "test" sets only the vocabulary of training / eval mode.
        """
        if split not in (None, "train", "test"):
            raise ValueError(f"split must be None, 'train' or 'test', got {split!r}")
        emb = torch.as_tensor(embeddings, dtype=torch.float32)
        dim = self.proj.out_features
        if emb.ndim != 2 or emb.shape[1] != dim:
            raise ValueError(
                f"Vocabulary embeddings of shape {tuple(emb.shape)} do not fit the classifier's "
                f"text dimension {dim}: use embeddings from the same text encoder"
            )
        emb = F.normalize(emb.to(self.proj.weight.device), dim=1)
        if split in (None, "train"):
            self.train_vocabulary = emb
        if split == "test":
            self.test_vocabulary = emb
        elif split is None:
            self.test_vocabulary = None

    @property
    def vocabulary(self) -> torch.Tensor:
        """(C, D) embeddings of the current mode."""
        if not self.training and self.test_vocabulary is not None:
            return self.test_vocabulary
        return self.train_vocabulary

    @property
    def num_classes(self) -> int:
        return self.vocabulary.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: (N, D_in) region features (more dims are flattened).

        Returns:
            (N, C + 1) logits with the background last, or (N, C) for background "none".
        """
        if x.dim() > 2:
            x = torch.flatten(x, start_dim=1)
        z = F.normalize(self.proj(x), dim=1)
        logits = z @ self.vocabulary.t() / self.temperature
        if self.bias is not None:
            logits = logits + self.bias
        if self.background == "learned":
            bg = z @ F.normalize(self.bg_embedding, dim=0) / self.temperature
            logits = torch.cat([logits, bg[:, None]], dim=1)
        elif self.background == "zero":
            # zeros_like keeps the batch size symbolic when the head is traced (export)
            logits = torch.cat([logits, torch.zeros_like(logits[:, :1])], dim=1)
        return logits

    def predict_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, C + 1) softmax, or (N, C) sigmoid class probabilities."""
        if self.loss_type == "softmax":
            return F.softmax(logits, dim=-1)
        return torch.sigmoid(logits[:, : self.num_classes])

    def losses(
        self, logits: torch.Tensor, gt_classes: torch.Tensor, generator=None
    ) -> Dict[str, torch.Tensor]:
        """Classification loss.

        Args:
            logits: (N, C [+ 1]) output of :meth:`forward`.
            gt_classes: (N,) class ids in [0, C], C meaning background.
            generator: random generator of the federated sampling.

        Returns:
            {"loss_cls": scalar}; softmax: mean cross-entropy; sigmoid: sum of binary CE over
            the (federated) classes divided by N.
        """
        num_classes = self.num_classes
        if len(logits) == 0:
            return {"loss_cls": logits.sum() * 0.0}
        if self.loss_type == "softmax":
            weight = None
            if self.bg_loss_weight != 1.0:
                weight = logits.new_ones(num_classes + 1)
                weight[num_classes] = self.bg_loss_weight
            return {"loss_cls": F.cross_entropy(logits, gt_classes, weight=weight)}
        cls_logits = logits[:, :num_classes]
        target = F.one_hot(gt_classes, num_classes + 1)[:, :num_classes].to(cls_logits.dtype)
        loss = F.binary_cross_entropy_with_logits(cls_logits, target, reduction="none")
        if self.use_fed_loss:
            if self.fed_loss_freq_weight.numel() != num_classes:
                raise ValueError(
                    f"Federated-loss weights cover {self.fed_loss_freq_weight.numel()} classes, "
                    f"the vocabulary {num_classes}"
                )
            keep = federated_classes(
                gt_classes, self.fed_loss_freq_weight, self.fed_loss_num_classes, generator
            )
            mask = torch.zeros(num_classes, dtype=loss.dtype, device=loss.device)
            mask[keep.to(loss.device)] = 1.0
            loss = loss * mask
        return {"loss_cls": loss.sum() / len(logits)}
