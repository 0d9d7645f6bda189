"""The build's CUDA toolkit search (build_tools/find_cuda.py) on toolkit trees
made in tmp_path, and the package's loading of the installed library when the
source tree's mla_cuda/ has none (mla_cuda/_loader.py)."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "build_tools"))
import find_cuda  # noqa: E402

NO_STANDARD = ()  # the tests' own trees only, not this machine's /usr/local/cuda


def _executable(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o755)
    return path


def fake_toolkit(home, version="13.0", cudart="lib64", nvcc_executable=True, headers=True):
    """A toolkit tree: bin/nvcc (a script that answers --version like nvcc),
    include/cuda_runtime.h and libcudart.so in `cudart` (None: no libcudart)."""
    nvcc = _executable(
        os.path.join(home, "bin", "nvcc"),
        f"#!/bin/sh\necho 'Cuda compilation tools, release {version}, V{version}.88'\n",
    )
    if not nvcc_executable:
        os.chmod(nvcc, 0o644)
    if headers:
        os.makedirs(os.path.join(home, "include"), exist_ok=True)
        open(os.path.join(home, "include", "cuda_runtime.h"), "w").close()
    if cudart:
        os.makedirs(os.path.join(home, cudart), exist_ok=True)
        open(os.path.join(home, cudart, "libcudart.so"), "w").close()
    return str(home)


def shim(bin_dir, target_nvcc):
    """A wrapper nvcc like /usr/local/bin/nvcc: a script that execs the real one."""
    return _executable(os.path.join(bin_dir, "nvcc"), f'#!/bin/sh\nexec {target_nvcc} "$@"\n')


def env_with_path(*dirs):
    return {"PATH": os.pathsep.join(str(d) for d in dirs)}


def test_a_wrapper_script_on_path_leads_to_the_toolkit_it_runs(tmp_path):
    home = fake_toolkit(tmp_path / "cuda-13.0")
    # The wrapper's own prefix looks like a toolkit but has no libcudart,
    # as /usr/local does next to /usr/local/bin/nvcc.
    os.makedirs(tmp_path / "usr" / "lib")
    shim(tmp_path / "usr" / "bin", os.path.join(home, "bin", "nvcc"))
    toolkit, note = find_cuda.find_cuda_toolkit("13.0", env_with_path(tmp_path / "usr" / "bin"), NO_STANDARD)
    assert toolkit is not None and toolkit.home == home, note
    assert toolkit.cudart_dir == os.path.join(home, "lib64")
    assert toolkit.version == "13.0"


def test_debians_layout_is_found_through_its_wrapper(tmp_path):
    """/usr/bin/nvcc runs /usr/lib/nvidia-cuda-toolkit/bin/nvcc; headers and
    libcudart live in /usr/include and /usr/lib/x86_64-linux-gnu."""
    usr = tmp_path / "usr"
    real = fake_toolkit(usr / "lib" / "nvidia-cuda-toolkit", cudart=None, headers=False)
    fake_toolkit(usr, cudart=os.path.join("lib", "x86_64-linux-gnu"))
    shim(usr / "bin", os.path.join(real, "bin", "nvcc"))
    toolkit, note = find_cuda.find_cuda_toolkit("13.0", env_with_path(usr / "bin"), NO_STANDARD)
    assert toolkit is not None and toolkit.home == str(usr), note
    assert toolkit.cudart_dir == str(usr / "lib" / "x86_64-linux-gnu")


def test_a_symlinked_nvcc_is_resolved(tmp_path):
    home = fake_toolkit(tmp_path / "cuda-13.0")
    os.makedirs(tmp_path / "bin")
    os.symlink(os.path.join(home, "bin", "nvcc"), tmp_path / "bin" / "nvcc")
    toolkit, _ = find_cuda.find_cuda_toolkit("13.0", env_with_path(tmp_path / "bin"), NO_STANDARD)
    assert toolkit is not None and toolkit.home == home


def test_a_toolkit_without_libcudart_is_rejected_and_the_next_candidate_taken(tmp_path):
    broken = fake_toolkit(tmp_path / "broken", cudart=None)
    good = fake_toolkit(tmp_path / "cuda-13.0")
    assert "libcudart" in find_cuda.inspect_toolkit(broken)
    toolkit, _ = find_cuda.find_cuda_toolkit(
        "13.0", env_with_path(os.path.join(broken, "bin")), [str(tmp_path / "cuda-*")]
    )
    assert toolkit is not None and toolkit.home == good


def test_a_non_executable_nvcc_or_missing_headers_are_rejected(tmp_path):
    home = fake_toolkit(tmp_path / "cuda", nvcc_executable=False)
    assert "no executable" in find_cuda.inspect_toolkit(home)
    home = fake_toolkit(tmp_path / "cuda-no-headers", headers=False)
    assert "cuda_runtime.h" in find_cuda.inspect_toolkit(home)


def test_libcudart_under_targets_is_found_and_reported_for_the_linker(tmp_path):
    home = fake_toolkit(tmp_path / "cuda", cudart=os.path.join("targets", "x86_64-linux", "lib"))
    toolkit = find_cuda.inspect_toolkit(home)
    assert toolkit.cudart_dir == os.path.join(home, "targets", "x86_64-linux", "lib")


def test_the_toolkit_matching_torchs_cuda_major_is_preferred(tmp_path):
    fake_toolkit(tmp_path / "cuda-12.8", version="12.8")
    new = fake_toolkit(tmp_path / "cuda-13.0", version="13.0")
    old_on_path = env_with_path(tmp_path / "cuda-12.8" / "bin")
    toolkit, _ = find_cuda.find_cuda_toolkit("13.0", old_on_path, [str(tmp_path / "cuda-*")])
    assert toolkit.home == new
    toolkit, _ = find_cuda.find_cuda_toolkit("12.6", env_with_path(tmp_path / "cuda-13.0" / "bin"),
                                             [str(tmp_path / "cuda-*")])
    assert toolkit.home == str(tmp_path / "cuda-12.8")


def test_version_json_is_read_before_asking_nvcc(tmp_path):
    home = fake_toolkit(tmp_path / "cuda", version="13.0")
    with open(os.path.join(home, "version.json"), "w") as f:
        f.write('{"cuda": {"name": "CUDA SDK", "version": "13.1.2"}}')
    assert find_cuda.inspect_toolkit(home).version == "13.1"


def test_no_usable_toolkit_gives_none_and_one_line_saying_what_to_set(tmp_path):
    fake_toolkit(tmp_path / "cuda-12.8", version="12.8")
    toolkit, note = find_cuda.find_cuda_toolkit("13.0", env_with_path(tmp_path / "empty"),
                                                [str(tmp_path / "cuda-*")])
    assert toolkit is None
    assert "\n" not in note and "CUDA_HOME" in note and "is CUDA 12.8" in note


def test_an_unusable_explicit_cuda_home_is_an_error_not_a_silent_fallback(tmp_path):
    fake_toolkit(tmp_path / "cuda-13.0")  # would be found by the search
    env = {"CUDA_HOME": str(tmp_path / "nowhere"), "PATH": str(tmp_path / "cuda-13.0" / "bin")}
    with pytest.raises(find_cuda.ToolkitError, match="CUDA_HOME=.*nowhere is not a usable CUDA toolkit"):
        find_cuda.find_cuda_toolkit("13.0", env, NO_STANDARD)
    old = fake_toolkit(tmp_path / "cuda-12.8", version="12.8")
    with pytest.raises(find_cuda.ToolkitError, match="is CUDA 12.8 but torch was built with CUDA 13.0"):
        find_cuda.find_cuda_toolkit("13.0", {"CUDA_PATH": old}, NO_STANDARD)


def test_an_explicit_cuda_home_is_taken_over_the_nvcc_on_path(tmp_path):
    chosen = fake_toolkit(tmp_path / "chosen")
    fake_toolkit(tmp_path / "other")
    env = {"CUDA_HOME": chosen, "PATH": str(tmp_path / "other" / "bin")}
    assert find_cuda.find_cuda_toolkit("13.0", env, NO_STANDARD)[0].home == chosen


def test_the_command_prints_the_toolkit_or_fails_with_the_reason(tmp_path):
    home = fake_toolkit(tmp_path / "cuda-13.0")
    script = os.path.join(ROOT, "build_tools", "find_cuda.py")
    env = dict(os.environ, CUDA_HOME=home)
    out = subprocess.run([sys.executable, script, "13.0"], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == home
    env["CUDA_HOME"] = str(tmp_path / "nowhere")
    out = subprocess.run([sys.executable, script, "13.0"], env=env, capture_output=True, text=True)
    assert out.returncode == 1 and "not a usable CUDA toolkit" in out.stderr


def test_a_source_tree_without_a_compiled_library_loads_the_installed_one(tmp_path):
    """python started in a checkout imports the checkout's mla_cuda/, which
    has no _C after `pip install .`; it must still work."""
    import mla_cuda

    mla_cuda.build_info()
    installed = os.path.dirname(sys.modules["mla_cuda._C"].__file__)
    checkout = tmp_path / "checkout"
    shutil.copytree(os.path.join(ROOT, "mla_cuda"), checkout / "mla_cuda",
                    ignore=shutil.ignore_patterns("_C*", "_build_info.py", "__pycache__"))
    code = (
        "import torch, mla_cuda\n"
        "info = mla_cuda.build_info()\n"
        "print(mla_cuda.__file__)\n"
        "print(info['library'])\n"
        "q, k = torch.randn(1, 3, 2, 4), torch.randn(1, 3, 1, 4)  # [batch, seq, heads, 2r]\n"
        "mla_cuda.partial_rope(q, k, torch.arange(3).view(1, 3), torch.tensor([[0, 1]]),"
        " 1.0 / 10000 ** (torch.arange(4) / 4))\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(installed), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], cwd=checkout, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    imported, library = out.stdout.split()[:2]
    assert imported == str(checkout / "mla_cuda" / "__init__.py")
    assert os.path.dirname(library) == installed


def test_the_compiled_library_is_searched_on_the_path_given(tmp_path):
    from mla_cuda import _loader

    here = tmp_path / "src" / "mla_cuda"
    other = tmp_path / "site" / "mla_cuda"
    os.makedirs(here)
    os.makedirs(other)
    assert _loader.compiled_package_dir(str(here), [str(tmp_path / "src"), str(tmp_path / "site")]) is None
    import importlib.machinery

    open(other / ("_C" + importlib.machinery.EXTENSION_SUFFIXES[0]), "w").close()
    assert _loader.compiled_package_dir(str(here), [str(tmp_path / "src"), str(tmp_path / "site")]) == str(other)


def _setup_py_tree(tmp_path):
    """A copy of what setup.py reads: itself, build_tools/, csrc/, mla_cuda/."""
    tree = tmp_path / "tree"
    for name in ("build_tools", "csrc", "mla_cuda"):
        shutil.copytree(os.path.join(ROOT, name), tree / name,
                        ignore=shutil.ignore_patterns("_C*", "_build_info.py", "__pycache__"))
    shutil.copy(os.path.join(ROOT, "setup.py"), tree / "setup.py")
    return tree


def _run_setup_py(tree, **env_changes):
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH", "MLA_SKIP_CUDA")}
    env.update(env_changes)
    # --name reads the configuration (so the extension is defined) and compiles nothing.
    return subprocess.run([sys.executable, "setup.py", "--name"], cwd=tree, env=env, capture_output=True, text=True)


def _build_info(tree):
    facts = {}
    exec(open(tree / "mla_cuda" / "_build_info.py").read(), facts)
    return facts


@pytest.mark.skipif(torch.version.cuda is None, reason="a CPU torch builds the CPU kernels only")
def test_setup_py_builds_with_the_toolkit_found_and_records_it(tmp_path):
    tree = _setup_py_tree(tmp_path)
    home = fake_toolkit(tmp_path / "cuda", version=torch.version.cuda)
    out = _run_setup_py(tree, CUDA_HOME=home)
    assert out.returncode == 0, out.stderr
    assert f"building CPU + CUDA kernels with CUDA toolkit {home}" in out.stdout
    facts = _build_info(tree)
    assert facts["WITH_CUDA"] and facts["CUDA_HOME"] == home and facts["CPU_ONLY_REASON"] is None


def test_setup_py_stops_in_one_line_on_a_wrong_cuda_home_and_skips_cuda_when_asked(tmp_path):
    tree = _setup_py_tree(tmp_path)
    out = _run_setup_py(tree, CUDA_HOME=str(tmp_path / "nowhere"))
    if torch.version.cuda is not None:
        assert out.returncode == 1
        assert out.stderr.strip().splitlines()[-1].startswith("mla_cuda: CUDA_HOME=")
    out = _run_setup_py(tree, CUDA_HOME=str(tmp_path / "nowhere"), MLA_SKIP_CUDA="1")
    assert out.returncode == 0, out.stderr
    assert "building the CPU kernels only: MLA_SKIP_CUDA=1" in out.stderr
    facts = _build_info(tree)
    assert not facts["WITH_CUDA"] and facts["CPU_ONLY_REASON"] == "MLA_SKIP_CUDA=1"
