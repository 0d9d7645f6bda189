"""Finds the CUDA toolkit to build mla_cuda's CUDA kernels with.

setup.py uses it before importing torch.utils.cpp_extension, which takes
CUDA_HOME as two folders above the `nvcc` on PATH. That guess fails where the
`nvcc` on PATH is a wrapper script or a symlink farm (e.g. /usr/local/bin/nvcc
running /usr/local/cuda-13.0/bin/nvcc): /usr/local has no libcudart and the
link fails after every kernel has compiled. Here a toolkit counts only when
what the build needs is there: an executable bin/nvcc, include/cuda_runtime.h
and a libcudart that `-lcudart` can link.

Also a command: `python build_tools/find_cuda.py [TORCH_CUDA_VERSION]` prints
the chosen toolkit's folder (tests/cpp/cmake_test.sh uses it), or the reason
there is none on stderr with exit status 1.

No torch import here, so it runs (and is tested) without building anything.
"""
import glob
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import List, Mapping, Optional, Sequence, Tuple

# Searched after CUDA_HOME/CUDA_PATH and the nvcc on PATH, in this order.
STANDARD_LOCATIONS = ("/usr/local/cuda", "/usr/local/cuda-*", "/opt/cuda")

# What `-lcudart` links: the unversioned shared library or the static archive
# (a libcudart.so.13 alone does not satisfy the linker).
_CUDART_NAMES = ("libcudart.so", "libcudart.a")


class ToolkitError(ValueError):
    """An explicitly chosen toolkit (CUDA_HOME or CUDA_PATH) cannot build."""


@dataclass(frozen=True)
class Toolkit:
    home: str  # the folder with bin/nvcc
    nvcc: str
    cudart_dir: str  # the folder holding libcudart, passed to the linker
    version: Optional[str]  # "13.0", None when neither version.json nor nvcc says


def _major(version: Optional[str]) -> Optional[str]:
    return version.split(".")[0] if version else None


def toolkit_version(home: str, nvcc: str) -> Optional[str]:
    """major.minor from version.json, else from `nvcc --version`."""
    try:
        with open(os.path.join(home, "version.json")) as f:
            full = json.load(f)["cuda"]["version"]
        return ".".join(full.split(".")[:2])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def inspect_toolkit(home: str):
    """A Toolkit when `home` can build CUDA kernels, else the reason it cannot (a str)."""
    nvcc = os.path.join(home, "bin", "nvcc")
    if not (os.path.isfile(nvcc) and os.access(nvcc, os.X_OK)):
        return f"no executable {nvcc}"
    # cpp_extension compiles with -I$CUDA_HOME/include only.
    if not os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
        return f"no {home}/include/cuda_runtime.h"
    lib_dirs = [os.path.join(home, "lib64"), os.path.join(home, "lib")]
    lib_dirs += sorted(glob.glob(os.path.join(home, "targets", "*", "lib")))
    lib_dirs += sorted(glob.glob(os.path.join(home, "lib", "*-linux-gnu")))  # Debian's multiarch /usr
    for lib_dir in lib_dirs:
        if any(os.path.isfile(os.path.join(lib_dir, name)) for name in _CUDART_NAMES):
            return Toolkit(home, nvcc, lib_dir, toolkit_version(home, nvcc))
    return f"no libcudart.so in {home}/lib64, lib, targets/*/lib or lib/*-linux-gnu"


def _script_targets(path: str) -> List[str]:
    """Absolute .../nvcc paths that a small wrapper script runs."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return []
    if not head.startswith(b"#!"):
        return []  # a binary: the real compiler
    text = head.decode("utf-8", "replace")
    return re.findall(r"(/[^\s\"'`;|&()<>$]*/nvcc)(?![\w.-])", text)


def nvcc_on_path_homes(path_env: Optional[str]) -> List[str]:
    """Toolkit folders the `nvcc` on PATH may belong to, best guess first:
    when it is a wrapper script, the folders of the nvcc it runs (followed a
    few levels), then the folder of its own real path (symlinks resolved)."""
    found = shutil.which("nvcc", path=path_env)
    homes: List[str] = []
    seen = set()
    todo = [found] if found else []
    while todo and len(seen) < 8:
        real = os.path.realpath(todo.pop(0))
        if real in seen:
            continue
        seen.add(real)
        targets = [t for t in _script_targets(real) if os.path.exists(t)]
        todo = targets + todo
        homes.append(os.path.dirname(os.path.dirname(real)))
    return homes[1:] + homes[:1]


def _version_key(path: str):
    return [int(n) for n in re.findall(r"\d+", os.path.basename(path))]


def standard_homes(locations: Sequence[str] = STANDARD_LOCATIONS) -> List[str]:
    homes: List[str] = []
    for loc in locations:
        if any(c in loc for c in "*?["):
            homes += sorted(glob.glob(loc), key=_version_key, reverse=True)  # newest first
        elif os.path.isdir(loc):
            homes.append(loc)
    return homes


def find_cuda_toolkit(
    torch_cuda: Optional[str],
    environ: Optional[Mapping[str, str]] = None,
    standard_locations: Sequence[str] = STANDARD_LOCATIONS,
) -> Tuple[Optional[Toolkit], str]:
    """(the toolkit to build with, or None; one line saying what was chosen or why none).

    torch_cuda: torch.version.cuda ("13.0"); a toolkit of another major
    version cannot build against that torch (cpp_extension refuses it).

    CUDA_HOME / CUDA_PATH, when set, is the user's explicit choice: if it cannot
    build, ToolkitError is raised rather than searching elsewhere or building
    CPU kernels only. Whoever sets it expects that toolkit, and pip shows a
    failed build's message but hides the output of one that succeeds, so a
    quiet fallback would turn a typo into a package without CUDA kernels.
    """
    env = os.environ if environ is None else environ
    want = _major(torch_cuda)
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = env.get(var)
        if not home:
            continue
        tk = inspect_toolkit(home)
        if isinstance(tk, str):
            raise ToolkitError(
                f"{var}={home} is not a usable CUDA toolkit ({tk}); point {var} at one, "
                "unset it to let the build search, or set MLA_SKIP_CUDA=1 for the CPU kernels only"
            )
        if want and tk.version and _major(tk.version) != want:
            raise ToolkitError(
                f"{var}={home} is CUDA {tk.version} but torch was built with CUDA {torch_cuda}; "
                f"point {var} at a CUDA {want}.x toolkit"
            )
        return tk, f"CUDA toolkit {home} (from {var})"

    candidates = nvcc_on_path_homes(env.get("PATH")) + standard_homes(standard_locations)
    usable: List[Toolkit] = []
    seen = set()
    for home in candidates:
        real = os.path.realpath(home)
        if real in seen:
            continue
        seen.add(real)
        tk = inspect_toolkit(home)
        if not isinstance(tk, str):
            usable.append(tk)
    # Same major version as torch first, then toolkits whose version is unknown.
    for tk in usable:
        if want is None or _major(tk.version) == want:
            return tk, f"CUDA toolkit {tk.home} (CUDA {tk.version}, found by search)"
    for tk in usable:
        if tk.version is None:
            return tk, f"CUDA toolkit {tk.home} (version unknown, found by search)"
    searched = ", ".join(["CUDA_HOME", "nvcc on PATH", *standard_locations])
    mismatched = "".join(f"; {tk.home} is CUDA {tk.version}" for tk in usable)
    wanted = f"CUDA {want}.x" if want else "CUDA"
    return None, (
        f"no usable {wanted} toolkit found (searched {searched}{mismatched}); to build the CUDA kernels, "
        f"set CUDA_HOME to a {wanted} toolkit (with bin/nvcc and lib64/libcudart.so) and reinstall"
    )


if __name__ == "__main__":
    torch_cuda = sys.argv[1] if len(sys.argv) > 1 else None
    try:
        toolkit, note = find_cuda_toolkit(torch_cuda)
    except ToolkitError as e:
        sys.exit(f"find_cuda: {e}")
    if toolkit is None:
        sys.exit(f"find_cuda: {note}")
    print(toolkit.home)
