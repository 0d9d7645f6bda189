"""What the command lines share: the error of an argument that cannot work,
device resolution, the command's name, and one-line error messages."""
import argparse

import torch

from .checkpoint import CheckpointExistsError


class UsageError(ValueError):
    """An argument that cannot work, found before any heavy work."""


def resolve_device(name: str) -> str:
    """cpu / cuda[:N] / auto as a torch device string; UsageError for a device
    this machine does not have."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: not a device; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: this machine has no usable CUDA GPU; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    elif dev.type != "cpu":
        raise UsageError(f"--device {name}: use cpu, cuda, cuda:N or auto")
    return name


def command_name() -> str:
    """The name the user ran the command by, as argparse's usage line shows
    it (from sys.argv[0]): mha2mla-convert for the console script,
    convert.py for `python python/convert.py`. Error messages start with it."""
    return argparse.ArgumentParser().prog


def one_line(e: BaseException) -> str:
    """An exception's message on one line (an error a user reads, not a traceback)."""
    return " ".join(str(e).split()) or type(e).__name__


def error_line(e: BaseException) -> str:
    """What a command prints for an error: its message on one line, in the
    command line's terms where the library's message is in Python's (a
    checkpoint already at --output is replaced with --overwrite, not
    overwrite=True)."""
    if isinstance(e, CheckpointExistsError):
        return f"{e.path} already holds a checkpoint: add --overwrite to replace it, or choose another --output"
    return one_line(e)
