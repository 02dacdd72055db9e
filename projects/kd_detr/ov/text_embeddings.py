# Copyright (c) kd_detr contributors.
"""Class text embeddings: build them with an open_clip text encoder, load them for a head.

Embeddings are (C, D) float32 rows, one per class in the dataset's class order, each the
re-normalised mean of the L2-normalised embeddings of every (name or synonym) x template prompt.
They are written as ``.npy`` with a JSON sidecar (same path, ``.json``) naming the classes, the
model, the weights and the templates.
"""
import json
import logging
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

__all__ = [
    "PROMPT_TEMPLATES",
    "build_text_embeddings",
    "coco_class_names",
    "encode_class_names",
    "load_text_embeddings",
    "lvis_class_names",
    "read_names_file",
    "read_sidecar",
    "save_text_embeddings",
    "sidecar_path",
]

logger = logging.getLogger(__name__)

# "single": Detic's prompt. "ensemble": a ViLD-style list of photo / scene descriptions (written
# for this project after the notes on ViLD's hand-crafted prompts; not ViLD's exact list).
PROMPT_TEMPLATES: Dict[str, tuple] = {
    "single": ("a {}",),
    "ensemble": (
        "a photo of a {}.",
        "a photo of the {}.",
        "a photo of one {}.",
        "a photo of a small {}.",
        "a photo of a large {}.",
        "a close-up photo of a {}.",
        "a cropped photo of a {}.",
        "a bright photo of a {}.",
        "a dark photo of a {}.",
        "a blurry photo of a {}.",
        "a low resolution photo of a {}.",
        "a good photo of a {}.",
        "a bad photo of a {}.",
        "a jpeg corrupted photo of a {}.",
        "a black and white photo of a {}.",
        "a photo of a {} in the scene.",
        "a photo of the {} in the scene.",
        "there is a {} in the scene.",
        "there is the {} in the scene.",
        "this is a {} in the scene.",
        "this is the {} in the scene.",
        "this is one {} in the scene.",
        "a picture of a {}.",
        "an image of a {}.",
        "itap of a {}.",
        "itap of the {}.",
        "a {} in a photo.",
        "a cropped image of the {}.",
        "a part of a {}.",
        "a photo of many {}.",
    ),
}


def sidecar_path(path: str) -> str:
    """``foo.npy`` -> ``foo.json``."""
    return os.path.splitext(os.fspath(path))[0] + ".json"


def coco_class_names() -> List[List[str]]:
    """The 80 COCO thing class names in category-id order, one single-name list each."""
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    return [[c["name"]] for c in COCO_CATEGORIES if c["isthing"] == 1]


def _clean_lvis_name(name: str) -> str:
    return name.replace("_", " ").strip()


def lvis_class_names(cat_info_json: str, synonyms: bool = False) -> List[List[str]]:
    """LVIS names (underscores -> spaces) in category-id order from a cat_info / LVIS json.

    Args:
        cat_info_json: a list of categories (Detic's cat_info) or a dict with "categories".
        synonyms: also return each category's synonyms (deduplicated, name first).
    """
    with open(cat_info_json) as f:
        data = json.load(f)
    cats = data["categories"] if isinstance(data, dict) else data
    out = []
    for cat in sorted(cats, key=lambda c: c["id"]):
        names = [_clean_lvis_name(cat["name"])]
        if synonyms:
            names += [_clean_lvis_name(s) for s in cat.get("synonyms", [])]
        out.append(list(dict.fromkeys(names)))
    return out


def read_names_file(path: str) -> List[List[str]]:
    """One class per non-empty line: ``name`` or ``name,synonym1,synonym2``."""
    out = []
    with open(path) as f:
        for line in f:
            names = [n.strip() for n in line.strip().split(",") if n.strip()]
            if names:
                out.append(list(dict.fromkeys(names)))
    if not out:
        raise ValueError(f"{path} lists no class names")
    return out


@torch.no_grad()
def encode_class_names(
    model, tokenizer, class_names: Sequence[Sequence[str]], templates: Sequence[str], device="cpu"
) -> torch.Tensor:
    """Prompt-ensembled text embeddings.

    Args:
        model: an open_clip model (``encode_text``).
        tokenizer: its tokenizer (list of strings -> (P, L) token ids).
        class_names: per class, its name and optional synonyms.
        templates: prompt templates with one "{}" each.

    Returns:
        (C, D) float32 unit-norm rows: per class, the mean over the normalised embeddings of all
        (name, template) prompts, re-normalised.
    """
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(f"Every prompt template needs a '{{}}' placeholder, got {templates}")
    rows = []
    for names in tqdm(class_names, desc="Encoding classes", unit="class"):
        prompts = [t.format(n) for n in names for t in templates]
        emb = model.encode_text(tokenizer(prompts).to(device)).float()
        rows.append(F.normalize(F.normalize(emb, dim=-1).mean(0), dim=0))
    return torch.stack(rows).cpu()


def save_text_embeddings(path: str, embeddings: torch.Tensor, meta: dict) -> None:
    """Write ``path`` (.npy float32) and its JSON sidecar (``meta`` plus the shape)."""
    arr = np.asarray(torch.as_tensor(embeddings, dtype=torch.float32).cpu().numpy())
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.save(path, arr)
    meta = dict(meta, num_classes=int(arr.shape[0]), dim=int(arr.shape[1]), normalized=True)
    with open(sidecar_path(path), "w") as f:
        json.dump(meta, f, indent=1)


def build_text_embeddings(
    class_names: Sequence[Sequence[str]],
    output: str,
    model_name: str = "ViT-B-32",
    pretrained: Optional[str] = "openai",
    templates: Sequence[str] = PROMPT_TEMPLATES["single"],
    device: str = "cpu",
) -> torch.Tensor:
    """Encode class names with an open_clip model and save ``output`` + sidecar.

    Args:
        class_names: per class, its name and optional synonyms.
        output: the .npy path to write.
        model_name: an open_clip model name (built-in or added with ``add_model_config``).
        pretrained: an open_clip pretrained tag (read from the user's cache, downloaded by
            open_clip if absent) or a local checkpoint file.
        templates: prompt templates with one "{}" each.

    Returns:
        (C, D) float32 unit-norm embeddings.
    """
    import open_clip  # optional third-party package: imported only when names are encoded

    model = open_clip.create_model(model_name, pretrained=pretrained or None, device=device)
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    emb = encode_class_names(model, tokenizer, class_names, templates, device=device)
    meta = {
        "names": [list(n) for n in class_names],
        "model": model_name,
        "pretrained": pretrained or "",
        "templates": list(templates),
    }
    save_text_embeddings(output, emb, meta)
    logger.info(f"Wrote {tuple(emb.shape)} text embeddings to {output}")
    return emb


def read_sidecar(path: str) -> Optional[dict]:
    """The JSON sidecar of an embeddings file, or None when there is none."""
    side = sidecar_path(path)
    if not os.path.isfile(side):
        return None
    with open(side) as f:
        return json.load(f)


def load_text_embeddings(
    path: str, expected_num: Optional[int] = None, expected_dim: Optional[int] = None
) -> torch.Tensor:
    """Load (C, D) class embeddings as float32 unit-norm rows.

    Reads our ``.npy`` (checked against its sidecar when present), Detic-style ``.npy`` (float16,
    not normalised) or a torch ``.pth`` tensor (RegionCLIP); rows are L2-normalised.

    Args:
        path: the embeddings file.
        expected_num: the number of classes C of the model / dataset, if known.
        expected_dim: the model's text embedding size D, if known.

    Raises:
        ValueError: on a shape mismatch (naming both numbers and the fix) or a zero row.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Text embeddings file not found: {path}")
    if path.endswith((".pth", ".pt")):
        arr = torch.load(path, map_location="cpu", weights_only=True)
        arr = arr.detach().float().numpy() if torch.is_tensor(arr) else np.asarray(arr)
    else:
        try:
            arr = np.load(path, allow_pickle=False)
        except ValueError as e:  # numpy: "Object arrays cannot be loaded when allow_pickle=False"
            raise ValueError(
                f"Text embeddings {path} are not a numeric array (.npy of floats): {e}. Save a "
                "(classes, dim) float array, e.g. with tools/build_text_embeddings.py"
            ) from e
    if not isinstance(arr, np.ndarray) or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(
            f"Text embeddings {path} must hold a numeric (classes, dim) array, got "
            f"{type(arr).__name__} of dtype {getattr(arr, 'dtype', None)}"
        )
    if arr.ndim != 2:
        raise ValueError(f"Text embeddings {path} must be a (classes, dim) array, got {arr.shape}")
    emb = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    num, dim = emb.shape
    meta = read_sidecar(path) if path.endswith(".npy") else None
    if meta is not None and len(meta.get("names", [])) not in (0, num):
        raise ValueError(
            f"Text embeddings {path} have {num} rows but their sidecar names "
            f"{len(meta['names'])} classes; rebuild them with tools/build_text_embeddings.py"
        )
    if expected_num is not None and num != expected_num:
        raise ValueError(
            f"Text embeddings {path} have {num} classes but the model / dataset has "
            f"{expected_num}: build embeddings for the same vocabulary, in the dataset's class "
            "order (tools/build_text_embeddings.py), or use the dataset they were made for"
        )
    if expected_dim is not None and dim != expected_dim:
        raise ValueError(
            f"Text embeddings {path} have dimension {dim} but the model expects "
            f"{expected_dim} (MODEL.OV.EMBED_DIM): set MODEL.OV.EMBED_DIM={dim}, or rebuild "
            "the embeddings with the text encoder of the CLIP model the detector is paired with"
        )
    finite = torch.isfinite(emb).all(dim=1)
    if not torch.all(finite):
        bad = torch.nonzero(~finite).flatten().tolist()
        raise ValueError(
            f"Text embeddings {path} have NaN or infinite values in rows {bad[:10]} "
            f"({len(bad)} rows): rebuild them (tools/build_text_embeddings.py)"
        )
    norms = emb.norm(dim=1)
    if not torch.all(norms > 0):
        bad = torch.nonzero(norms == 0).flatten().tolist()
        raise ValueError(f"Text embeddings {path} have all-zero rows {bad[:10]}")
    return emb / norms[:, None]
