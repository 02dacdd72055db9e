# Copyright (c) kd_detr contributors.
"""Where kd_detr keeps generated files and finds the shared real data.

* :func:`cache_root`: ``$KD_DETR_DATA``, else ``~/.cache/kd_detr`` (generated datasets, derived
  split jsons, cached teacher runs): the one place this rule is written.
* :func:`expand_data_path`: config paths may start with ``$KD_DETR_SHARED_DATA`` (the shared real
  data, default ``../shared/data`` relative to the working directory).
"""
import os

__all__ = ["SHARED_DATA_VAR", "cache_root", "expand_data_path", "shared_data_root"]

CACHE_VAR = "KD_DETR_DATA"
SHARED_DATA_VAR = "KD_DETR_SHARED_DATA"


def cache_root(*parts: str) -> str:
    """``$KD_DETR_DATA/<parts>``, or ``~/.cache/kd_detr/<parts>`` when the variable is unset or
    empty; absolute, ``~`` expanded, not created."""
    base = os.environ.get(CACHE_VAR, "") or os.path.join("~", ".cache", "kd_detr")
    return os.path.abspath(os.path.expanduser(os.path.join(base, *parts)))


def shared_data_root() -> str:
    """``$KD_DETR_SHARED_DATA``, else ``../shared/data`` relative to the working directory."""
    root = os.environ.get(SHARED_DATA_VAR, "") or os.path.join("..", "shared", "data")
    return os.path.abspath(os.path.expanduser(root))


def expand_data_path(path: str) -> str:
    """Replace a leading ``$KD_DETR_SHARED_DATA`` / ``${KD_DETR_SHARED_DATA}`` by
    :func:`shared_data_root` (also when the variable is unset), then other ``$VARS`` and ``~``.
    An empty path stays empty."""
    if not path:
        return path
    for token in (f"${{{SHARED_DATA_VAR}}}", f"${SHARED_DATA_VAR}"):
        if path.startswith(token):
            path = shared_data_root() + path[len(token) :]
            break
    return os.path.expanduser(os.path.expandvars(path))
