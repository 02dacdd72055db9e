# Copyright (c) kd_detr contributors.
"""Query denoising (DN-DETR) and contrastive denoising (DINO): noised ground-truth queries, their
attention mask and losses."""
from .attention_mask import denoising_attention_mask
from .config import add_denoising_config, denoising_args_from_config
from .loss import denoising_loss_key, denoising_losses
from .noise import noise_boxes, noise_boxes_contrastive, noise_labels
from .queries import DenoisingGenerator, DenoisingQueries
