"""Loads the compiled library, or says in one line why it cannot."""
import importlib

import torch

_INFO = None


def build_info() -> dict:
    """What the compiled library was built with: torch version, whether the
    CUDA kernels are in, and for which architectures."""
    if _INFO is None:
        load_extension()
    return dict(_INFO)


def _rebuild_hint() -> str:
    return "rebuild it against this torch: pip install --no-build-isolation --force-reinstall ."


def load_extension() -> None:
    global _INFO
    if _INFO is not None:
        return
    try:
        facts = importlib.import_module("mla_cuda._build_info")
    except ImportError:
        raise ImportError(
            "mla_cuda: the compiled extension is missing (no mla_cuda/_build_info.py); "
            "install the package with: pip install --no-build-isolation ."
        ) from None
    if facts.TORCH_VERSION != torch.__version__:
        raise ImportError(
            f"mla_cuda was built against torch {facts.TORCH_VERSION} but torch "
            f"{torch.__version__} is installed; {_rebuild_hint()}"
        )
    import glob
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    if not glob.glob(os.path.join(here, "_C.*")):
        raise ImportError(
            f"mla_cuda: no compiled library in {here}. If that is a source checkout, run from another "
            "directory (the installed package is then imported) or build in place: python setup.py build_ext --inplace"
        )
    try:
        from . import _C
    except (ImportError, OSError) as e:
        raise ImportError(f"mla_cuda: cannot load its compiled library ({e}); {_rebuild_hint()}") from None
    _INFO = dict(_C.build_info())
