# Copyright (c) kd_detr contributors.
"""``NamedRegistry``: Detectron2's ``Registry`` whose entries may be registered under a chosen
name (config values such as ``TEST.EVALUATOR coco`` or ``MODEL.KD.POINTS consistent``)."""
from typing import Any, Callable, Optional

from detectron2.utils.registry import Registry

__all__ = ["NamedRegistry"]


class NamedRegistry(Registry):
    """A ``Registry`` with ``register(obj=None, name=None)`` and an error that lists the valid
    names.

    Examples::

        EVALUATOR_REGISTRY = NamedRegistry("EVALUATOR")

        @EVALUATOR_REGISTRY.register(name="coco")
        class FastCOCOEvaluator(DatasetEvaluator): ...

        EVALUATOR_REGISTRY.get("coco")  # -> FastCOCOEvaluator
    """

    def register(self, obj: Any = None, name: Optional[str] = None) -> Any:
        """Register ``obj`` under ``name`` (default: its ``__name__``); usable as a decorator."""
        if obj is None:

            def deco(func_or_class: Callable) -> Callable:
                self._do_register(name or func_or_class.__name__, func_or_class)
                return func_or_class

            return deco
        self._do_register(name or obj.__name__, obj)
        return obj

    def names(self):
        """Registered names, in registration order."""
        return list(self._obj_map)

    def get(self, name: str) -> Any:
        """The object registered as ``name``; KeyError naming the registry and the valid names."""
        if name not in self._obj_map:
            raise KeyError(
                f"No object named {name!r} in the {self._name} registry; registered: "
                f"{', '.join(self.names()) or '(none)'}"
            )
        return self._obj_map[name]
