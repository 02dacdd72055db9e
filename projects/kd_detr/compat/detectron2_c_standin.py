# Copyright (c) kd_detr contributors.
"""Stand-in for ``detectron2._C`` when detectron2 is installed from its Python sources only.

``tools/install_detectron2.py`` copies this file to ``detectron2/_C.py`` when it installs the
PyPI sdist ``pb1-detectron2==0.6``, whose C++/CUDA sources are absent. Importing it succeeds, so
``import detectron2.layers`` works; calling any compiled op (deformable conv, rotated boxes,
ROIAlignRotated, the C++ COCOeval) raises :class:`MissingCompiledOpError` naming the op.
"""

KD_DETR_STANDIN = True

_BUILD_HINT = (
    "detectron2 was installed from Python sources without its compiled extension "
    "(detectron2._C is kd_detr's stand-in). Build detectron2 from source to use this op: "
    "pip install 'git+https://github.com/facebookresearch/detectron2.git' "
    "(see README.md, 'Install on a GPU machine')."
)


class MissingCompiledOpError(RuntimeError):
    """Raised when code calls a detectron2 op that needs the compiled ``_C`` extension."""


class _MissingOp:
    """A callable placeholder for one compiled op; calling it raises a clear error."""

    def __init__(self, name):
        self.__name__ = name
        self.__qualname__ = name

    def __call__(self, *args, **kwargs):
        message = f"detectron2._C.{self.__name__} is not available: {_BUILD_HINT}"
        raise MissingCompiledOpError(message)

    def __repr__(self):
        return f"<missing detectron2._C op {self.__name__}>"


def get_compiler_version():
    return "not built (kd_detr stand-in for detectron2._C)"


def get_cuda_version():
    return "not built (kd_detr stand-in for detectron2._C)"


def has_cuda():
    return False


def _register_missing_torch_ops():
    """``layers/nms.py`` calls ``torch.ops.detectron2.nms_rotated``: define it to raise clearly."""
    try:
        import torch

        lib = torch.library.Library("detectron2", "DEF")
        lib.define("nms_rotated(Tensor boxes, Tensor scores, float iou_threshold) -> Tensor")

        def nms_rotated(boxes, scores, iou_threshold):
            _MissingOp("nms_rotated")()

        lib.impl("nms_rotated", nms_rotated, "CompositeExplicitAutograd")
        return lib
    except Exception:  # an op library named detectron2 exists already: leave it alone
        return None


_TORCH_OPS_LIBRARY = _register_missing_torch_ops()


def __getattr__(name):
    # Module-level __getattr__ (PEP 562): only reached for names not defined above.
    if name.startswith("__"):
        raise AttributeError(name)
    return _MissingOp(name)
