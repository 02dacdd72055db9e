# Copyright (c) kd_detr contributors.
from .dab_detr import DABDETR, block_diagonal_mask
from .deformable_detr import DeformableDETR
from .detr import DETR, padding_mask
from .dfine import DFINE
from .dino import DINO
from .rtdetr import RTDETR
