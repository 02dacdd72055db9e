# Copyright (c) kd_detr contributors.
from .dab_detr import DABDETR, block_diagonal_mask
from .detr import DETR, padding_mask
