# Copyright (c) kd_detr contributors.
"""Checks of a bench plan before anything trains: configs that resolve, the dataset switch
(``--train`` / ``--test``) and the class counts and names of the teacher and the students.
A mixin of ``Bench`` in ``tools/kd_bench.py`` (which owns ``args``, ``spec``, ``arms``,
``teacher_config``, ``base_entries`` and ``data``)."""
from .arms import DATA_KEYS, BenchError
from .data import DataSwitch, resolve_dataset, split_classes
from .runs import resolve_config


def _pick(*values):
    return next((v for v in values if v is not None), None)


def _value(cfg, key):
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


class BenchChecksMixin:
    """Config resolution, the dataset switch and the class checks of a bench."""

    def _resolve(self, what, config, opts):
        try:
            return resolve_config(config, opts)
        except Exception as e:  # a bad key, a dataset file that is missing, ...
            raise BenchError(f"{what}: cannot resolve config {config!r}: {e}") from e

    def _check_claims(self):
        """Every claim's metric is one the bench reports (arms file ``metrics:``)."""
        for claim in self.spec.claims:
            if claim.metric is not None and claim.metric not in self.metrics:
                raise BenchError(
                    f"claim {claim.better!r} above {claim.than!r}: metric {claim.metric!r} is not "
                    f"one the bench reports {list(self.metrics)} (arms file 'metrics:')"
                )

    def _resolve_data(self):
        """The dataset switch (None without --train / --test)."""
        from detectron2.data import DatasetCatalog, MetadataCatalog

        defaults = {"train_split": "trainval", "test_split": "test"}
        data = {k: _pick(getattr(self.args, k, None), self.spec.data.get(k), defaults.get(k, ""))
                for k in DATA_KEYS}  # fmt: skip
        if not data["train"] and not data["test"]:
            return None
        if not data["train"] or not data["test"]:
            raise BenchError("the dataset switch needs both --train and --test")
        reference = self.teacher_config or self.arms[0].config
        try:  # registers the datasets the config itself lists (e.g. BCCD's VOC entries)
            cfg = resolve_config(reference)
            self.base_entries = {"COCO_JSON": list(cfg.DATASETS.COCO_JSON),
                                 "VOC": list(cfg.DATASETS.VOC)}  # fmt: skip
        except Exception:
            pass  # its own data may be absent here; registered names still resolve
        catalog = {n: MetadataCatalog.get(n).get("thing_classes", None)
                   for n in DatasetCatalog.list()}  # fmt: skip
        classes = split_classes(data["classes"])
        train = resolve_dataset(data["train"], "train", images=data["train_images"],
                                split=data["train_split"], classes=classes, catalog=catalog)
        test = resolve_dataset(data["test"], "test", images=data["test_images"],
                               split=data["test_split"], classes=classes, catalog=catalog)
        return DataSwitch(train, test)

    def data_opts(self, what, config, opts=(), class_key=True):
        """Dataset-switch overrides for a model config (with its class-count key)."""
        from kd_detr.modeling.num_classes import num_classes_key

        if self.data is None:
            return []
        plain = self.data.opts(None, self.base_entries)
        key = num_classes_key(self._resolve(what, config, list(opts) + plain))
        return self.data.opts(key if class_key else None, self.base_entries)

    def _classes_of(self, cfg):
        from detectron2.data import MetadataCatalog

        if not cfg.DATASETS.TRAIN:
            return None
        return MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).get("thing_classes", None)

    def _check_classes(self, what, cfg):
        from kd_detr.modeling.num_classes import check_num_classes

        try:
            check_num_classes(cfg)
        except ValueError as e:
            raise BenchError(f"{what}: {e}") from e

    def _check_teacher_classes(self, arm, student_cfg, teacher_cfg):
        from kd_detr.modeling.num_classes import num_classes_key

        if student_cfg.MODEL.KD.CLASS_MAPPING:
            return  # the KD trainer maps the classes by name and checks them
        # COCO json datasets get their class names only when loaded: the switch knows them.
        classes = self.data.classes if self.data else self._classes_of(student_cfg)
        s_key, t_key = num_classes_key(student_cfg), num_classes_key(teacher_cfg)
        if t_key is None:
            return
        count = _value(teacher_cfg, t_key)
        expected = len(classes) if classes is not None else _value(student_cfg, s_key)
        names = self._classes_of(teacher_cfg)
        wrong_names = classes is not None and names is not None and list(names) != list(classes)
        if count != expected or wrong_names:
            shown = f" ({', '.join(classes[:8])})" if classes else ""
            raise BenchError(
                f"arm {arm.name!r}: the teacher ({self.teacher_config}) has {count} classes "
                f"({t_key}{': ' + ', '.join(names[:8]) if names else ''}) but the data has "
                f"{expected}{shown}. Train the teacher on this data (drop --teacher-weights), or "
                "map the classes with MODEL.KD.CLASS_MAPPING."
            )
