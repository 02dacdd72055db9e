# Copyright (c) kd_detr contributors.
"""The package ``kd_detr`` lives in ``projects/kd_detr`` (Detectron2's project layout)."""
from setuptools import find_packages, setup

setup(
    packages=["kd_detr"] + [f"kd_detr.{p}" for p in find_packages("projects/kd_detr")],
    package_dir={"kd_detr": "projects/kd_detr"},
)
