# Copyright (c) kd_detr contributors.
"""How much of a model a checkpoint must fill (``MODEL.WEIGHTS_MIN_LOADED_PERCENT``), checked
right after the model's state is loaded (``SafeCheckpointer.load_policy``).

Default rule (``MODEL.WEIGHTS_MIN_LOADED_PERCENT`` < 0):

* ``--eval-only``: every state-dict entry of the model must load (a partly loaded model would be
  evaluated with random parts).
* training from ``MODEL.WEIGHTS``: a pretrained backbone (every loaded entry under ``backbone.``)
  is fine; a detector checkpoint must fill every non-head entry (heads: the class-count dependent
  modules of :data:`HEAD_KEY_PATTERNS`, which fine-tuning on other classes re-initialises).
* resuming (``--resume``): every entry must load and nothing may be left over, else the folder
  holds another model's checkpoint.

``MODEL.WEIGHTS_MIN_LOADED_PERCENT`` in [0, 100] replaces the rule by "at least this share of the
entries loads" (0: anything, e.g. evaluating a random initialisation on purpose); the policies
take it as a fraction ``min_loaded`` in [0, 1].
"""
from typing import Callable, List, Sequence

__all__ = [
    "HEAD_KEY_PATTERNS",
    "loaded_keys",
    "resume_load_policy",
    "weights_load_policy",
]

# State-dict key parts of class-count dependent heads (DETR family, Faster R-CNN, denoising).
HEAD_KEY_PATTERNS = ("class_embed", "bbox_embed", "box_predictor", "cls_score", "label_enc")


def _short(keys: Sequence[str], limit: int = 8) -> str:
    keys = sorted(keys)
    more = f", ... ({len(keys)} in all)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def loaded_keys(model_keys: Sequence[str], incompatible) -> List[str]:
    """Model state-dict keys filled by the checkpoint (not missing, no shape mismatch)."""
    missing = set(incompatible.missing_keys) | {k for k, _, _ in incompatible.incorrect_shapes}
    return [k for k in model_keys if k not in missing]


def _is_head(key: str) -> bool:
    return any(pattern in key for pattern in HEAD_KEY_PATTERNS)


def weights_load_policy(model, *, min_loaded: float = -1.0, eval_only: bool = False) -> Callable:
    """The policy of loading ``MODEL.WEIGHTS`` into ``model`` (see the module doc).

    Raises (from the returned policy):
        ValueError: naming the checkpoint, the share that loaded and the unmatched keys.
    """
    model_keys = list(model.state_dict().keys())

    def policy(incompatible, path: str) -> None:
        loaded = loaded_keys(model_keys, incompatible)
        unmatched = sorted(set(model_keys) - set(loaded))
        share = len(loaded) / max(len(model_keys), 1)
        what = f"MODEL.WEIGHTS {path!r} filled {len(loaded)} of {len(model_keys)} model entries"
        fix = (
            "Check that the checkpoint is of this model (meta-architecture, backbone, widths), or "
            "set MODEL.WEIGHTS_MIN_LOADED_PERCENT to the share you accept (0 accepts anything)."
        )
        if min_loaded >= 0:
            if share < min_loaded:
                raise ValueError(
                    f"{what} ({share:.1%} < MODEL.WEIGHTS_MIN_LOADED_PERCENT "
                    f"{min_loaded * 100:g}); unmatched: {_short(unmatched)}. {fix}"
                )
            return
        if not loaded:
            raise ValueError(f"{what}: nothing of the model loaded. {fix}")
        if eval_only:
            if unmatched:
                raise ValueError(
                    f"{what}; --eval-only would evaluate a partly random model. Unmatched: "
                    f"{_short(unmatched)}. {fix}"
                )
            return
        if all(k.startswith("backbone.") for k in loaded):
            return  # a pretrained backbone
        body = [k for k in unmatched if not _is_head(k)]
        if body:
            raise ValueError(
                f"{what}; besides the class heads these are not filled: {_short(body)}. {fix}"
            )

    return policy


def resume_load_policy(model, output_dir: str) -> Callable:
    """The policy of resuming ``model`` from ``output_dir``: the checkpoint must fit exactly.

    Raises (from the returned policy):
        ValueError: naming the folder and the keys that do not fit.
    """
    model_keys = list(model.state_dict().keys())

    def policy(incompatible, path: str) -> None:
        problems = []
        if incompatible.missing_keys:
            problems.append(f"missing {_short(incompatible.missing_keys)}")
        if incompatible.unexpected_keys:
            problems.append(f"unexpected {_short(incompatible.unexpected_keys)}")
        if incompatible.incorrect_shapes:
            shapes = [k for k, _, _ in incompatible.incorrect_shapes]
            problems.append(f"other shapes {_short(shapes)}")
        if problems:
            raise ValueError(
                f"--resume: {path} in OUTPUT_DIR {output_dir!r} is a checkpoint of another model "
                f"({len(model_keys)} model entries; {'; '.join(problems)}). Use another OUTPUT_DIR "
                "for this config, or drop --resume and set OVERWRITE_OUTPUT_DIR True to start "
                "over in this one."
            )

    return policy
