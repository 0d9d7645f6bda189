"""Weight averaging of fine-tuned checkpoints ("model soup"): runs that
started from the same checkpoint (e.g. stage-2 runs with different
objectives after one attention transfer) often average into a model that
keeps what each gained. The checkpoints must be the same conversion (same
mla block apart from the weights' hash, same parameter shapes); the average
is saved as a checkpoint like any other.

python -m mha2mla.average_checkpoints RUN_A/last RUN_B/last [--weights 0.5 0.5] --output DIR"""
import argparse
import os
import sys
from typing import List, Optional

import torch

from .checkpoint import CheckpointError, OutputFolderError, check_output_folder, load_mla_model, save_mla_model
from .cli_args import command_name, error_line

HASH_KEY = "weights_sha256"


def average_checkpoints(paths: List[str], weights: Optional[List[float]] = None):
    """The weighted average (weights normalised to sum to 1; default equal)
    of the checkpoints' floating-point parameters and buffers, as a model on
    the CPU. Integer buffers (rope frequency indices) must be equal."""
    if len(paths) < 2:
        raise ValueError("give at least two checkpoints to average")
    weights = weights or [1.0] * len(paths)
    if len(weights) != len(paths) or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"need one non-negative weight per checkpoint ({len(paths)}), not all zero: got {weights}")
    weights = [w / sum(weights) for w in weights]
    model = load_mla_model(paths[0], torch.float32, "cpu")
    block = {k: v for k, v in model.config.mla.items() if k != HASH_KEY}
    total = {k: v.double() * weights[0] if v.is_floating_point() else v for k, v in model.state_dict().items()}
    for path, w in zip(paths[1:], weights[1:]):
        other = load_mla_model(path, torch.float32, "cpu")
        if {k: v for k, v in other.config.mla.items() if k != HASH_KEY} != block:
            raise CheckpointError(f"{path} is another conversion than {paths[0]} (config.json's mla blocks differ)")
        state = other.state_dict()
        if state.keys() != total.keys() or any(state[k].shape != total[k].shape for k in total):
            raise CheckpointError(f"{path} and {paths[0]} hold different parameters or shapes")
        for k, v in state.items():
            if v.is_floating_point():
                total[k] += v.double() * w
            elif not torch.equal(v, total[k]):
                raise CheckpointError(f"{path} and {paths[0]} differ in {k}, which cannot be averaged")
        del other
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    model.load_state_dict({k: v.to(dtypes[k]) for k, v in total.items()})
    return model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="+", help="converted checkpoints (e.g. finetune.py's RUN/last)")
    ap.add_argument("--weights", type=float, nargs="+", default=None, help="one per checkpoint (default: equal)")
    ap.add_argument("--output", required=True, help="where the averaged checkpoint goes (a new or empty folder)")
    ap.add_argument("--overwrite", action="store_true", help="replace a checkpoint already at --output (files it did not write are kept)")
    a = ap.parse_args(argv)

    def fail(e) -> int:
        print(f"{command_name()}: {error_line(e)}", file=sys.stderr)
        return 2

    seen = set()
    for path in a.checkpoints:
        if os.path.realpath(path) in seen:
            print(f"{command_name()}: note: {path} is given more than once and counts once per mention "
                  "(--weights sets the weights)", file=sys.stderr)
        seen.add(os.path.realpath(path))
    try:
        check_output_folder(a.output, a.overwrite)
        model = average_checkpoints(a.checkpoints, a.weights)
    except (ValueError, CheckpointError) as e:
        return fail(e)
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(a.checkpoints[0])
    except (OSError, ValueError):
        tok = None  # a checkpoint saved without a tokenizer
    try:  # the folder is checked again as the save starts: something may have arrived since
        save_mla_model(model, a.output, tok, overwrite=a.overwrite)
    except (OutputFolderError, OSError) as e:
        return fail(e)
    print(f"averaged checkpoint of {len(a.checkpoints)} runs: {a.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
