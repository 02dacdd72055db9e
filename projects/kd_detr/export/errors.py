# Copyright (c) kd_detr contributors.
"""Errors of the export tools: one line that names the fix, printed as is by the tools."""
import importlib

__all__ = ["ExportError", "require_package"]


class ExportError(RuntimeError):
    """An export / deployment problem the user can fix; its message is one line naming the fix."""


def require_package(module: str, pip_name: str = "", extra: str = ""):
    """Import and return the optional module ``module``.

    Raises:
        ExportError: "... is not installed ... Fix: pip install <pip_name> (or pip install -e
            .[<extra>])" when it is missing.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        hint = f" (or pip install -e .[{extra}])" if extra else ""
        raise ExportError(
            f"the optional package {module!r} is not installed ({e}). Fix: pip install "
            f"{pip_name or module}{hint}"
        ) from None
