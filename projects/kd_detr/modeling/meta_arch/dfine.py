# Copyright (c) kd_detr contributors.
"""D-FINE (Peng et al., ICLR 2025) as a Detectron2 meta-architecture: RT-DETR's pipeline with
D-FINE's hybrid-encoder blocks (RepNCSPELAN4, SCDown) and its decoder (gated projection-free
deformable attention, fine-grained distribution refinement, location-quality estimator).
"""
from typing import Dict, List

import torch
from torch import nn

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY

from ..transformer import MLP
from ..transformer.dfine_decoder import DFineDecoder
from .rtdetr import RTDETR

__all__ = ["DFINE"]


@META_ARCH_REGISTRY.register()
class DFINE(RTDETR):
    """D-FINE. As :class:`RTDETR` (query selection, denoising, extra query groups,
    ``forward_raw`` outputs), except:

    * ``bbox_embed[l]`` predicts four edge distributions (4 x (NUM_BINS + 1) logits) that add up
      over the layers; layer l's boxes are the coarse layer-0 box (``pre_bbox_head``) moved by
      their expected distances (FDR). "layers" also hold "pred_corners" (L, B, N, 4 (bins + 1)),
      and the outputs "initial_boxes" / "pre_boxes" (B, N, 4) and "pre_logits" (B, N, C) (layer 0's
      class head before the LQE, with the coarse boxes).
    * Logits are the class head's plus the LQE score of the layer's distributions.
    * With equal encoder and decoder widths the decoder input projections are identities.
    """

    @configurable
    def __init__(self, *, num_bins: int = 32, **kwargs):
        """
        Args:
            num_bins: bins per edge distribution minus one (``MODEL.DFINE.NUM_BINS``).
            kwargs: arguments of :class:`RTDETR`; ``transformer`` must be a DFineDecoder.
        """
        super().__init__(**kwargs)
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
        ret["num_bins"] = cfg.MODEL.DFINE.NUM_BINS
        return ret

    @classmethod
    def _encoder_style(cls, cfg) -> Dict:
        return {"style": "dfine"}

    @classmethod
    def _build_decoder(cls, cfg, points: List[int]) -> nn.Module:
        d, r, f = cfg.MODEL.DETR, cfg.MODEL.RTDETR, cfg.MODEL.DFINE
        return DFineDecoder(
            d_model=d.HIDDEN_DIM,
            num_layers=d.DEC_LAYERS,
            heads=d.NHEADS,
            ffn_dim=d.DIM_FEEDFORWARD,
            dropout=d.DROPOUT,
            activation=d.ACTIVATION,
            points=points,
            offset_scale=r.OFFSET_SCALE,
            method=r.SAMPLING_METHOD,
            kernel=d.DEFORMABLE.ATTN_KERNEL,
            num_bins=f.NUM_BINS,
            reg_scale=f.REG_SCALE,
            up=f.UP,
            lqe_top_k=f.LQE_TOP_K,
            lqe_hidden_dim=f.LQE_HIDDEN_DIM,
            lqe_layers=f.LQE_LAYERS,
        )

    def predict(self, decoded: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Per-layer logits ``class_embed[l](h_l)`` plus the LQE score of the layer's
        distributions, and layer 0's class logits before the LQE ("pre_logits")."""
        hs, corners = decoded["hidden_states"], decoded["pred_corners"]
        raw = [head(h) for head, h in zip(self.class_embed, hs)]
        logits = torch.stack(
            [lqe(s, c) for lqe, s, c in zip(self.transformer.lqe_layers, raw, corners)]
        )
        return dict(decoded, pred_logits=logits, pre_logits=raw[0])
