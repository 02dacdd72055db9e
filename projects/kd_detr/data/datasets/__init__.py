# Copyright (c) kd_detr contributors.
"""kd_detr's datasets. Importing this package registers "kd_demo_train" and "kd_demo_val", the
class-incremental demo split "kd_demo_incremental_*" and the config-driven sources ``KD_DEMO``,
``COCO_JSON``, ``INCREMENTAL`` and ``VOC`` of ``DATASET_SOURCE_REGISTRY``."""
from .catalog import absolute_path, already_registered
from .coco_json import load_coco_json_checked, register_coco_json, register_coco_json_from_config
from .demo import (
    DEMO_CLASSES,
    DemoSettings,
    demo_dataset_dir,
    demo_root,
    generate_demo_dataset,
    prepare_demo_dataset,
    register_demo_datasets,
)
from .pascal_voc import load_voc_instances, register_voc, register_voc_from_config
from .registry import DATASET_SOURCE_REGISTRY, register_from_config, split_config_entry

# Last: the INCREMENTAL source splits datasets the sources above registered (COCO_JSON, VOC).
from .incremental_split import (  # noqa: E402  (isort: skip)
    base_training_set,
    check_base_classes,
    check_class_ids,
    few_shot_novel_set,
    register_incremental_split,
)

__all__ = [k for k in globals().keys() if not k.startswith("_")]
