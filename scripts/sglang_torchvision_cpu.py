"""Installed as _pykvshm_torchvision_cpu.py (+ a .pth line importing it) into the SGLang
environment by scripts/setup_engines_env.sh.

The torchvision wheel on PyPI is a CUDA build: its _C extension needs libtorch_cuda.so,
so with a CPU-only torch it does not load, and torchvision 0.28 then fails at import
(``RuntimeError: operator torchvision::nms does not exist`` from an unguarded
``register_fake``).  SGLang imports torchvision unconditionally (sglang.srt.configs ->
internvl_utils).  Just before torchvision is first imported, this declares the schemas of
the two operators torchvision registers fake kernels for, without kernels (calling them
raises), so torchvision imports with its compiled ops unavailable.  SGLang's KV-cache
paths never call them.
"""

import importlib.abc
import sys

_lib = None


def declare() -> None:
    global _lib
    if _lib is not None:
        return
    import torch

    try:
        torch.ops.torchvision.nms  # noqa: B018  (a working torchvision build defines it)
        return
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "FRAGMENT")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _lib = lib


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):  # type: ignore[no-untyped-def]
        if name == "torchvision":
            sys.meta_path.remove(self)
            declare()
        return None


sys.meta_path.insert(0, _BeforeTorchvision())
