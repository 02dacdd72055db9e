# Copyright (c) kd_detr contributors.
"""Pascal-VOC style datasets with custom class names.

A VOC folder holds ``Annotations/<id>.xml``, ``JPEGImages/<id>.jpg`` and
``ImageSets/Main/<split>.txt`` (one image id per line). Unlike Detectron2's own VOC loader this one
takes any class names, checks every object's class, and drops degenerate boxes with a warning.
"""
import logging
import os
import xml.etree.ElementTree as ET

from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from ...utils import expand_data_path
from .catalog import absolute_path, already_registered
from .registry import DATASET_SOURCE_REGISTRY, split_config_entry

__all__ = ["load_voc_instances", "register_voc", "register_voc_from_config"]

logger = logging.getLogger(__name__)


def _text(node, tag, xml_file):
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise ValueError(f"{xml_file}: missing or empty <{tag}>")
    return child.text.strip()


def _number(node, tag, xml_file):
    value = _text(node, tag, xml_file)
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{xml_file}: <{tag}> is not a number: {value!r}") from None


def _image_file(dirname, file_id, root):
    """``JPEGImages/<id>.jpg``, or the XML's <filename> when only that one exists."""
    default = os.path.join(dirname, "JPEGImages", file_id + ".jpg")
    if not os.path.isfile(default):
        named = root.findtext("filename")
        if named and os.path.isfile(os.path.join(dirname, "JPEGImages", named.strip())):
            return os.path.join(dirname, "JPEGImages", named.strip())
    return default


def _image_size(root, file_name, xml_file):
    """(height, width) from <size>, or from the image header when <size> is missing or zero."""
    size = root.find("size")
    if size is not None:
        height = int(_number(size, "height", xml_file))
        width = int(_number(size, "width", xml_file))
        if height > 0 and width > 0:
            return height, width
    with Image.open(file_name) as image:
        width, height = image.size
    return height, width


def _parse_voc_xml(xml_file, dirname, file_id, class_to_id, keep_difficult):
    """One dataset dict (without "image_id") and the number of degenerate boxes dropped."""
    try:
        root = ET.parse(xml_file).getroot()
    except FileNotFoundError:
        raise FileNotFoundError(f"VOC annotation file not found: {xml_file}") from None
    except ET.ParseError as e:
        raise ValueError(f"{xml_file} is not valid XML: {e}") from e
    file_name = _image_file(dirname, file_id, root)
    height, width = _image_size(root, file_name, xml_file)

    annotations, num_degenerate = [], 0
    for obj in root.findall("object"):
        class_name = _text(obj, "name", xml_file)
        if class_name not in class_to_id:
            raise ValueError(
                f"{xml_file}: object class {class_name!r} is not one of the dataset's classes "
                f"{list(class_to_id)}"
            )
        difficult = obj.findtext("difficult")
        difficult = int(float(difficult)) if difficult and difficult.strip() else 0
        if difficult and not keep_difficult:
            continue
        box = obj.find("bndbox")
        if box is None:
            raise ValueError(f"{xml_file}: an object of class {class_name!r} has no <bndbox>")
        x0, y0, x1, y1 = (_number(box, tag, xml_file) for tag in ("xmin", "ymin", "xmax", "ymax"))
        # VOC corners are 1-based pixel indices, both inclusive. A box whose max corner does not
        # exceed its min corner marks no extent (an annotation slip), so it is dropped.
        if x1 <= x0 or y1 <= y0:
            num_degenerate += 1
            continue
        annotations.append(
            {
                "category_id": class_to_id[class_name],
                # To 0-based continuous coordinates: (xmin=1, xmax=W) spans the whole image.
                "bbox": [x0 - 1.0, y0 - 1.0, x1, y1],
                "bbox_mode": BoxMode.XYXY_ABS,
                "difficult": difficult,
            }
        )
    record = {"file_name": file_name, "height": height, "width": width, "annotations": annotations}
    return record, num_degenerate


def load_voc_instances(dirname, split, class_names, *, keep_difficult=True):
    """Load a Pascal-VOC style split into Detectron2's standard dataset dicts.

    Args:
        dirname (str): folder with ``Annotations/``, ``JPEGImages/`` and ``ImageSets/Main/``.
        split (str): name of the image-id list ``ImageSets/Main/<split>.txt``.
        class_names (list[str]): the dataset's classes; an object of another class is an error.
        keep_difficult (bool): keep objects flagged ``difficult`` (as Detectron2 does); each
            annotation records the flag under "difficult".

    Returns:
        list[dict]: one dict per image, ``image_id`` being the image's index in the split file.
            Boxes are XYXY_ABS in 0-based pixel coordinates (xmin and ymin minus 1).
    """
    class_names = list(class_names)
    if not class_names or len(set(class_names)) != len(class_names):
        raise ValueError(f"class_names must be non-empty and unique, got {class_names}")
    split_file = os.path.join(dirname, "ImageSets", "Main", split + ".txt")
    if not os.path.isfile(split_file):
        raise FileNotFoundError(
            f"VOC split file not found: {split_file} "
            "(expected <dirname>/ImageSets/Main/<split>.txt)"
        )
    with open(split_file, "r") as f:
        file_ids = [line.split()[0] for line in f if line.strip()]

    class_to_id = {name: i for i, name in enumerate(class_names)}
    dataset_dicts = []
    for image_id, file_id in enumerate(file_ids):
        xml_file = os.path.join(dirname, "Annotations", file_id + ".xml")
        record, num_degenerate = _parse_voc_xml(
            xml_file, dirname, file_id, class_to_id, keep_difficult
        )
        if num_degenerate:
            logger.warning(
                f"{xml_file}: dropped {num_degenerate} box(es) with zero or negative area "
                "(xmax <= xmin or ymax <= ymin)."
            )
        record["image_id"] = image_id
        dataset_dicts.append(record)
    return dataset_dicts


def register_voc(name, dirname, split, class_names, year=None, *, keep_difficult=True):
    """Register a Pascal-VOC style split under ``name`` (read lazily, on first use).

    The metadata has ``thing_classes``, ``dirname``, ``split`` (and ``year`` when given) and
    ``evaluator_type="coco"``: kd_detr evaluates every dataset with COCO AP. Registering the same
    name again with the same settings is a no-op; with other settings, an error.

    Args:
        name (str): dataset name, e.g. "bccd_train".
        dirname (str): the VOC folder (see :func:`load_voc_instances`).
        split (str): image-id list ``ImageSets/Main/<split>.txt``.
        class_names (list[str]): the dataset's classes, in category-id order.
        year (int or None): optional VOC year, only stored in the metadata.
        keep_difficult (bool): keep objects flagged ``difficult``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"Dataset name must be a non-empty string, got {name!r}")
    dirname, class_names = absolute_path(dirname), list(class_names)
    split_file = os.path.join(dirname, "ImageSets", "Main", split + ".txt")
    if not os.path.isfile(split_file):
        raise FileNotFoundError(f"VOC split file for dataset {name!r} not found: {split_file}")
    if already_registered(name, dirname=dirname, split=split, thing_classes=class_names):
        return
    DatasetCatalog.register(
        name,
        lambda: load_voc_instances(dirname, split, class_names, keep_difficult=keep_difficult),
    )
    extra = {} if year is None else {"year": year}
    MetadataCatalog.get(name).set(
        thing_classes=class_names, dirname=dirname, split=split, evaluator_type="coco", **extra
    )


@DATASET_SOURCE_REGISTRY.register(name="VOC")
def register_voc_from_config(cfg):
    """Register every ``cfg.DATASETS.VOC`` entry ("name,path/to/voc_dir,split,class1;class2;...",
    split being an ImageSets/Main file; the folder may start with ``$KD_DETR_SHARED_DATA``);
    returns the names."""
    names = []
    for entry in cfg.DATASETS.get("VOC", []):
        name, dirname, split, classes = split_config_entry(
            entry, "VOC", 4, "name,path/to/voc_dir,trainval,cat;dog"
        )
        class_names = [c.strip() for c in classes.split(";")]
        if not all(class_names) or len(set(class_names)) != len(class_names):
            raise ValueError(
                f"Malformed cfg.DATASETS.VOC entry {entry!r}: class names must be non-empty, "
                f"unique and separated by ';', got {class_names}"
            )
        register_voc(name, expand_data_path(dirname), split, class_names)
        names.append(name)
    return names
