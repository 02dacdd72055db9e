# Copyright (c) kd_detr contributors.
"""Data: dataset registration (importing this package registers the built-in demo datasets)."""
from . import datasets
from .datasets import *
