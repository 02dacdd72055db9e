# Copyright (c) kd_detr contributors.
"""Vocabularies for a dataset: the rows of a class-embedding file picked by class name.

One embedding file for many classes (e.g. Detic's 80 COCO classes) serves any dataset whose
classes it names (the 48 COCO-OVD base classes for training, the 65 OVD classes for testing).
"""
from typing import List, Optional, Sequence, Tuple

import torch

from detectron2.data import DatasetCatalog, MetadataCatalog

from ..utils import expand_data_path
from .text_embeddings import coco_class_names, load_text_embeddings, read_sidecar

__all__ = [
    "dataset_vocabularies",
    "dataset_vocabulary",
    "embedding_row_names",
    "select_vocabulary",
]


def _norm(name: str) -> str:
    return " ".join(name.replace("_", " ").lower().split())


def embedding_row_names(path: str, num_rows: int) -> List[str]:
    """Class name of every row of an embedding file: its sidecar's first names, or the 80 COCO
    classes (category-id order) for an 80-row file without a sidecar (Detic's COCO file).

    Raises:
        ValueError: when the rows cannot be named.
    """
    meta = read_sidecar(path) if path.endswith(".npy") else None
    if meta is not None and meta.get("names"):
        return [n[0] if isinstance(n, (list, tuple)) else str(n) for n in meta["names"]]
    if num_rows == 80:
        return [n[0] for n in coco_class_names()]
    raise ValueError(
        f"Cannot tell which class each of the {num_rows} rows of {path} is: it has no JSON "
        "sidecar with 'names' and is not an 80-row COCO file. Build it with "
        "tools/build_text_embeddings.py, or turn MODEL.OV.DETR_HEAD.VOCABULARY_FROM_DATASETS off "
        "and give a file whose rows follow the dataset's class order"
    )


def select_vocabulary(
    embeddings: torch.Tensor, row_names: Sequence[str], class_names: Sequence[str], source=""
) -> torch.Tensor:
    """Rows of ``embeddings`` (R, D) for ``class_names`` (C names), in that order: (C, D).

    Names match case-insensitively, with underscores as spaces.

    Raises:
        ValueError: naming the classes that have no row.
    """
    index = {_norm(n): i for i, n in enumerate(row_names)}
    missing = [n for n in class_names if _norm(n) not in index]
    if missing:
        raise ValueError(
            f"Text embeddings {source} have no row for the classes {missing[:10]} "
            f"({len(missing)} of {len(class_names)}): build embeddings for these names with "
            "tools/build_text_embeddings.py"
        )
    rows = torch.tensor([index[_norm(n)] for n in class_names], dtype=torch.long)
    return embeddings[rows]


def dataset_vocabulary(
    path: str, dataset_name: str, expected_dim: Optional[int] = None
) -> torch.Tensor:
    """(C, D) unit-norm embeddings of ``path`` for the ``thing_classes`` of a registered dataset
    (a COCO-json dataset is loaded once when its metadata does not list them yet).

    Raises:
        ValueError: when the dataset has no ``thing_classes`` (not registered) or a class has
            no row.
    """
    classes = MetadataCatalog.get(dataset_name).get("thing_classes", None)
    if classes is None and dataset_name in DatasetCatalog.list():
        DatasetCatalog.get(dataset_name)  # load_coco_json sets thing_classes
        classes = MetadataCatalog.get(dataset_name).get("thing_classes", None)
    if classes is None:
        raise ValueError(
            f"Dataset {dataset_name!r} has no thing_classes: register it (e.g. "
            "DATASETS.COCO_OVD, DATASETS.COCO_JSON) and load it once before building the model, "
            "or turn MODEL.OV.DETR_HEAD.VOCABULARY_FROM_DATASETS off"
        )
    emb = load_text_embeddings(path, expected_dim=expected_dim)
    return select_vocabulary(emb, embedding_row_names(path, len(emb)), classes, source=path)


def dataset_vocabularies(
    cfg, switch: str, need_both: bool
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The (train, test) vocabularies of a config whose ``switch`` key asks for vocabularies
    picked by dataset class names: rows of ``MODEL.OV.TEXT_EMBEDDINGS`` for the classes of
    ``DATASETS.TRAIN[0]``, rows of ``MODEL.OV.TEST_TEXT_EMBEDDINGS`` (else ``TEXT_EMBEDDINGS``) for
    those of ``DATASETS.TEST[0]``; paths may start with ``$KD_DETR_SHARED_DATA``.

    Args:
        switch (str): the config key that asked (named in errors).
        need_both (bool): both datasets must be set (else at least one).

    Returns:
        tuple: (C_train, D) or None without a training dataset, (C_test, D) or None without a
        test dataset.
    """
    ov = cfg.MODEL.OV
    train_set = cfg.DATASETS.TRAIN[0] if cfg.DATASETS.TRAIN else None
    test_set = cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else None
    if need_both:
        missing = train_set is None or test_set is None
    else:
        missing = train_set is None and test_set is None
    if missing:
        raise ValueError(
            f"{switch} needs DATASETS.TRAIN {'and' if need_both else 'or'} DATASETS.TEST: set "
            f"{'both' if need_both else 'one'}, or give embeddings in the datasets' class order "
            "and turn it off"
        )
    train_path = expand_data_path(ov.TEXT_EMBEDDINGS)
    test_path = expand_data_path(ov.TEST_TEXT_EMBEDDINGS) or train_path
    train = test = None
    if test_set is not None:
        test = dataset_vocabulary(test_path, test_set, expected_dim=ov.EMBED_DIM)
    if train_set is not None:
        train = dataset_vocabulary(train_path, train_set, expected_dim=ov.EMBED_DIM)
    return train, test
