# Copyright (c) kd_detr contributors.
"""D-FINE (Peng et al., ICLR 2025) as a Detectron2 meta-architecture: RT-DETR's pipeline with
D-FINE's hybrid-encoder blocks (RepNCSPELAN4, SCDown) and its decoder (gated projection-free
deformable attention, fine-grained distribution refinement, location-quality estimator).
"""
import re
from typing import Dict, List

import torch
from torch import nn

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.utils import comm

from ..box_ops import box_cxcywh_to_xyxy, paired_box_iou
from ..transformer import MLP
from ..transformer.dfine_decoder import DFineDecoder
from .dfine_losses import ddf_loss, fgl_loss, union_indices
from .rtdetr import RTDETR
from .rtdetr_criterion import denoising_targets

__all__ = ["DFINE"]


def _dn_key(key: str) -> str:
    """``loss_fgl_0`` -> ``loss_fgl_dn_0``, ``loss_class_pre`` -> ``loss_class_dn_pre``."""
    match = re.match(r"^(loss_[a-z]+)(.*)$", key)
    return f"{match[1]}_dn{match[2]}"


@META_ARCH_REGISTRY.register()
class DFINE(RTDETR):
    """D-FINE. As :class:`RTDETR` (query selection, denoising, extra query groups,
    ``forward_raw`` outputs), except:

    * ``bbox_embed[l]`` predicts four edge distributions (4 x (NUM_BINS + 1) logits) that add up
      over the layers; layer l's boxes are the coarse layer-0 box (``pre_bbox_head``) moved by
      their expected distances (FDR). "layers" also hold "pred_corners" (L, B, N, 4 (bins + 1)),
      and the outputs "initial_boxes" / "pre_boxes" (B, N, 4) and "pre_logits" (B, N, C) (layer 0's
      class head before the LQE, with the coarse boxes); so do the extra query groups, and
      :meth:`corner_offsets` says what the bins mean (distribution distillation from a teacher,
      ``DistributionKDLoss``).
    * Logits are the class head's plus the LQE score of the layer's distributions.
    * With equal encoder and decoder widths the decoder input projections are identities.
    * Losses: RT-DETR's on every layer, the coarse boxes ("_pre"), the selected encoder tokens
      ("_enc") and the denoising queries ("_dn"), plus ``loss_fgl`` (fine-grained localization)
      on every layer and, with GO-LSD, ``loss_ddf`` (every layer but the last distills the last
      one's distributions), see :mod:`.dfine_losses`.
    """

    @configurable
    def __init__(
        self,
        *,
        num_bins: int = 32,
        go_lsd: bool = True,
        ddf_temperature: float = 5.0,
        union_matching: bool = True,
        **kwargs,
    ):
        """
        Args:
            num_bins: bins per edge distribution minus one (``MODEL.DFINE.NUM_BINS``).
            go_lsd: GO-LSD self-distillation (``loss_ddf``).
            ddf_temperature: its temperature.
            union_matching: box losses on the union of all layers' matches (GO-LSD).
            kwargs: arguments of :class:`RTDETR`; ``transformer`` must be a DFineDecoder.
        """
        super().__init__(**kwargs)
        self.go_lsd = go_lsd
        self.ddf_temperature = ddf_temperature
        self.union_matching = union_matching
        d, d_enc = self.transformer.d_model, self.encoder.d
        self.num_bins = num_bins
        num_layers = self.transformer.num_decoder_layers
        self.bbox_embed = nn.ModuleList(
            MLP(d, d, 4 * (num_bins + 1), 3) for _ in range(num_layers)
        )
        with torch.no_grad():
            for head in self.bbox_embed:
                head.layers[-1].weight.zero_()
                head.layers[-1].bias.zero_()
        if d_enc == d:
            levels = len(self.in_features)
            for i in range(levels):
                self.decoder_input_proj[i] = nn.Identity()
            if len(self.decoder_input_proj) > levels:
                raise ValueError(
                    "D-FINE with equal encoder and decoder widths reads only the encoder's maps: "
                    "set MODEL.RTDETR.NUM_FEATURE_LEVELS to len(MODEL.RTDETR.IN_FEATURES)"
                )

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        d, f = cfg.MODEL.DETR, cfg.MODEL.DFINE
        base = cls._loss_weights(cfg)
        box_terms = dict(base, loss_fgl=f.FGL_WEIGHT, loss_ddf=f.DDF_WEIGHT)
        if not f.GO_LSD:
            box_terms.pop("loss_ddf")
        num = d.DEC_LAYERS
        per_layer = {f"{k}_{i}": v for i in range(num - 1) for k, v in box_terms.items()}
        weights = {k: v for k, v in box_terms.items() if k != "loss_ddf"}  # last layer
        if d.DEEP_SUPERVISION:
            weights.update(per_layer)
        weights.update({f"{k}_pre": v for k, v in base.items()})
        weights.update({f"{k}_enc": v * cfg.MODEL.RTDETR.ENC_LOSS_WEIGHT for k, v in base.items()})
        if d.DN.ENABLED:
            dn = {k: v for k, v in weights.items() if not k.endswith("_enc")}
            weights.update({_dn_key(k): v for k, v in dn.items()})
        ret["criterion"].weight_dict = weights
        ret.update(
            num_bins=f.NUM_BINS,
            go_lsd=f.GO_LSD,
            ddf_temperature=f.DDF_TEMPERATURE,
            union_matching=f.UNION_MATCHING,
        )
        return ret

    @classmethod
    def _check_sampling(cls, cfg, points: List[int]) -> None:
        """D-FINE samples like RT-DETRv2 (per-level points, offset scale, method)."""

    @classmethod
    def _encoder_style(cls, cfg) -> Dict:
        return {"style": "dfine"}

    @classmethod
    def _build_decoder(cls, cfg, points: List[int]) -> nn.Module:
        f = cfg.MODEL.DFINE
        return DFineDecoder(
            **cls._decoder_args(cfg, points),
            num_bins=f.NUM_BINS,
            reg_scale=f.REG_SCALE,
            up=f.UP,
            lqe_top_k=f.LQE_TOP_K,
            lqe_hidden_dim=f.LQE_HIDDEN_DIM,
            lqe_layers=f.LQE_LAYERS,
        )

    def corner_offsets(self) -> torch.Tensor:
        """(num_bins + 1,) what each bin of "pred_corners" means: the distance from the centre of
        the query's "initial_boxes" to the edge, in units of that box's width (left / right
        edges) or height (top / bottom), ``0.5 + W(n) / |reg_scale|`` (see
        :func:`~kd_detr.modeling.transformer.dfine_decoder.distance2bbox`). Models predicting
        box distributions expose this for distribution distillation (``DistributionKDLoss``)."""
        dec = self.transformer
        return 0.5 + dec.project() / dec.reg_scale.abs()

    def predict(self, decoded: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Per-layer logits ``class_embed[l](h_l)`` plus the LQE score of the layer's
        distributions, and layer 0's class logits before the LQE ("pre_logits")."""
        hs, corners = decoded["hidden_states"], decoded["pred_corners"]
        raw = [head(h) for head, h in zip(self.class_embed, hs)]
        logits = torch.stack(
            [lqe(s, c) for lqe, s, c in zip(self.transformer.lqe_layers, raw, corners)]
        )
        return dict(decoded, pred_logits=logits, pre_logits=raw[0])

    # ---------------------------------------------------------------- losses
    def losses(self, outputs, targets) -> Dict[str, torch.Tensor]:
        """Weighted losses (keys in ``criterion.weight_dict``): every layer's varifocal / L1 /
        GIoU / FGL (+ DDF before the last layer), the coarse boxes', the selected encoder
        tokens' and, training with denoising, the denoising queries' (fixed matching). With
        union matching the box losses use the union of all layers' and the encoder's matches."""
        crit = self.criterion
        num_boxes = crit.get_num_boxes(targets, outputs["pred_logits"].device)
        layers, enc = outputs["layers"], outputs["enc_outputs"]
        own = [crit.matcher(self._layer(layers, i), targets) for i in self._loss_layers(layers)]
        enc_idx = crit.matcher(enc, targets)
        go, num_go = None, num_boxes
        if self.union_matching:
            go = union_indices(own + [enc_idx])
            num_go = self._num_matched(go, enc["pred_logits"].device)
        loss_dict = self._set_losses(layers, targets, own, num_boxes, go, num_go)
        enc_terms = crit.loss_labels(enc, targets, enc_idx, num_boxes)
        enc_terms.update(crit.loss_boxes(enc, targets, go or enc_idx, num_go))
        loss_dict.update({f"{k}_enc": v for k, v in enc_terms.items()})
        if self.training and self.denoising is not None:
            dn = outputs.get("denoising")
            if dn is None:  # no object: zeros keeping the label embedding in the graph
                zero = outputs["pred_logits"].sum() * 0 + self.denoising.label_enc.weight.sum() * 0
                loss_dict.update({k: zero for k in crit.weight_dict if "_dn" in k})
            else:
                queries = dn["queries"]
                dn_targets, fixed = denoising_targets(queries)
                n_dn = num_boxes * queries.num_groups
                own_dn = [fixed] * len(self._loss_layers(dn))
                terms = self._set_losses(dn, dn_targets, own_dn, n_dn, fixed, n_dn, fixed=True)
                loss_dict.update({_dn_key(k): v for k, v in terms.items()})
        return {k: v * crit.weight_dict[k] for k, v in loss_dict.items() if k in crit.weight_dict}

    def _loss_layers(self, out) -> List[int]:
        num = out["pred_logits"].shape[0]
        return list(range(num)) if self.aux_loss else [num - 1]

    @staticmethod
    def _layer(out, i: int) -> Dict[str, torch.Tensor]:
        return {"pred_logits": out["pred_logits"][i], "pred_boxes": out["pred_boxes"][i]}

    @staticmethod
    def _num_matched(indices, device) -> float:
        """Matched pairs per process (all-reduced), at least 1."""
        total = torch.tensor([float(sum(len(q) for q, _ in indices))], device=device)
        world = comm.get_world_size()
        if world > 1:
            torch.distributed.all_reduce(total)
        return torch.clamp(total / world, min=1).item()

    def _set_losses(self, out, targets, own, num_boxes, box_indices, num_box, fixed=False):
        """Losses of one query set's layers ("pred_logits" (L, B, N, C), "pred_boxes",
        "pred_corners", "initial_boxes", "pre_logits", "pre_boxes").

        Args:
            own: per loss layer, its matching (class losses, normalised by ``num_boxes``).
            box_indices: the matching of the box losses (L1, GIoU, FGL, DDF) of every layer and
                the coarse boxes, normalised by ``num_box``; None: each layer's own.
            fixed: ``own`` is one fixed matching (denoising), also used for the coarse boxes.
        """
        crit, dec = self.criterion, self.transformer
        layer_ids = self._loss_layers(out)
        last = out["pred_logits"].shape[0] - 1
        losses = {}
        for i, idx in zip(layer_ids, own):
            layer = self._layer(out, i)
            box_idx = idx if box_indices is None else box_indices
            box_n = num_boxes if box_indices is None else num_box
            terms = crit.loss_labels(layer, targets, idx, num_boxes)
            terms.update(crit.loss_boxes(layer, targets, box_idx, box_n))
            batch, src = crit._src_index(box_idx, layer["pred_boxes"].device)
            tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, box_idx)])
            tgt = box_cxcywh_to_xyxy(tgt.to(layer["pred_boxes"]))
            iou = paired_box_iou(box_cxcywh_to_xyxy(layer["pred_boxes"][batch, src].detach()), tgt)
            corners = out["pred_corners"][i]
            terms["loss_fgl"] = fgl_loss(
                corners[batch, src], out["initial_boxes"][batch, src], tgt, iou,
                self.num_bins, dec.reg_scale, dec.up, box_n,
            )  # fmt: skip
            if self.go_lsd and i < last:
                matched = torch.zeros(corners.shape[:2], dtype=torch.bool, device=corners.device)
                matched[batch, src] = True
                rowmajor = (batch * corners.shape[1] + src).argsort()  # the mask's order
                terms["loss_ddf"] = ddf_loss(
                    corners, out["pred_corners"][-1], out["pred_logits"][-1], matched,
                    iou[rowmajor], self.num_bins, self.ddf_temperature,
                )  # fmt: skip
            suffix = "" if i == last else f"_{i}"
            losses.update({k + suffix: v for k, v in terms.items()})
        pre = {"pred_logits": out["pre_logits"], "pred_boxes": out["pre_boxes"]}
        pre_idx = own[-1] if fixed else crit.matcher(pre, targets)
        terms = crit.loss_labels(pre, targets, pre_idx, num_boxes)
        if box_indices is None:
            terms.update(crit.loss_boxes(pre, targets, pre_idx, num_boxes))
        else:
            terms.update(crit.loss_boxes(pre, targets, box_indices, num_box))
        losses.update({f"{k}_pre": v for k, v in terms.items()})
        return losses
