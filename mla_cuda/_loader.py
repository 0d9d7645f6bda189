"""Loads the compiled library, or says in one line why it cannot.

The library (_C) and its _build_info.py are taken from this package's folder
when it has them, else from the first other mla_cuda folder on sys.path that
has them. Why: `pip install .` compiles into site-packages, not into the
checkout, and Python started in the checkout's root imports the checkout's
mla_cuda/ first (the working directory leads sys.path); that copy has the
Python files but no library. Borrowing the installed library keeps
`python -c "import mla_cuda"` and the README's examples working there, with
the plain (non-editable) install the README gives.
"""
import importlib.machinery
import importlib.util
import os
import sys
from typing import Iterable, Optional

import torch

_INFO = None
_HERE = os.path.dirname(os.path.abspath(__file__))


def build_info() -> dict:
    """What the compiled library was built with: torch version, whether the
    CUDA kernels are in, for which architectures, with which toolkit (or why
    none), and which library file was loaded."""
    if _INFO is None:
        load_extension()
    return dict(_INFO)


def _rebuild_hint() -> str:
    return "rebuild it against this torch: pip install --no-build-isolation --force-reinstall ."


def _library_file(package_dir: str) -> Optional[str]:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(package_dir, "_C" + suffix)
        if os.path.isfile(path):
            return path
    return None


def compiled_package_dir(here: str = _HERE, search_path: Optional[Iterable[str]] = None) -> Optional[str]:
    """The mla_cuda folder whose _C to load: `here` when it has one, else the
    first other `<entry>/mla_cuda` of search_path (default sys.path) that has
    one; None when there is none."""
    if _library_file(here):
        return here
    for entry in sys.path if search_path is None else search_path:
        candidate = os.path.join(os.path.abspath(entry or os.curdir), "mla_cuda")
        if _library_file(candidate) and not os.path.samefile(candidate, here):
            return candidate
    return None


def _load_file(name: str, path: str):
    spec = importlib.util.spec_from_file_location(f"mla_cuda.{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[spec.name] = module
    setattr(sys.modules["mla_cuda"], name, module)
    return module


def load_extension() -> None:
    global _INFO
    if _INFO is not None:
        return
    lib_dir = compiled_package_dir()
    if lib_dir is None:
        raise ImportError(
            f"mla_cuda: no compiled library in {_HERE} and no installed mla_cuda that has one; "
            "install the package with: pip install --no-build-isolation ."
        )
    try:
        facts = _load_file("_build_info", os.path.join(lib_dir, "_build_info.py"))
    except OSError:
        raise ImportError(
            f"mla_cuda: {lib_dir} has a compiled library but no _build_info.py; {_rebuild_hint()}"
        ) from None
    if facts.TORCH_VERSION != torch.__version__:
        raise ImportError(
            f"mla_cuda was built against torch {facts.TORCH_VERSION} but torch "
            f"{torch.__version__} is installed; {_rebuild_hint()}"
        )
    library = _library_file(lib_dir)
    try:
        compiled = _load_file("_C", library)
    except (ImportError, OSError) as e:
        raise ImportError(f"mla_cuda: cannot load its compiled library ({e}); {_rebuild_hint()}") from None
    _INFO = dict(compiled.build_info())
    _INFO["cuda_home"] = getattr(facts, "CUDA_HOME", None)
    _INFO["cpu_only_reason"] = getattr(facts, "CPU_ONLY_REASON", None)
    _INFO["library"] = library
