"""One-shot conversion study: many conversions of one model from one set of
calibration statistics, each scored by WikiText-2 perplexity. Produces the
tables of the conversion report (bench/results/oneshot_ppl_<card>.*)."""
import copy
import json
import time

import torch

from .calibration import collect_statistics
from .converter import ConversionOptions, convert_model
from .modeling import kv_cache_bytes_per_token
from .perplexity import perplexity
from .results import save_results

# (label, options) in the order of the table
VARIANTS = [
    ("partial RoPE only (2norm, r=4), no truncation", dict(rope_strategy="2norm", d_kv=0, whiten=False)),
    ("d_kv=32 plain SVD (2norm)", dict(rope_strategy="2norm", d_kv=32, whiten=False)),
    ("d_kv=16 plain SVD (2norm)", dict(rope_strategy="2norm", d_kv=16, whiten=False)),
    ("d_kv=8 plain SVD (2norm)", dict(rope_strategy="2norm", d_kv=8, whiten=False)),
    ("d_kv=32 whitened SVD (2norm)", dict(rope_strategy="2norm", d_kv=32)),
    ("d_kv=16 whitened SVD (2norm)", dict(rope_strategy="2norm", d_kv=16)),
    ("d_kv=8 whitened SVD (2norm)", dict(rope_strategy="2norm", d_kv=8)),
    ("d_kv=32 whitened, rope high", dict(rope_strategy="high", d_kv=32)),
    ("d_kv=32 whitened, rope low", dict(rope_strategy="low", d_kv=32)),
    ("d_kv=32 whitened, rope uniform", dict(rope_strategy="uniform", d_kv=32)),
    ("d_kv=32 whitened, rope 2norm-global", dict(rope_strategy="2norm-global", d_kv=32)),
    ("d_kv=32 whitened, rope pca (RoRoPE)", dict(rope_strategy="pca", d_kv=32)),
    ("d_kv=32 whitened, rope pca, energy ranks", dict(rope_strategy="pca", d_kv=32, rank_allocation="energy")),
    ("d_kv=32 whitened, rope 2norm, energy ranks", dict(rope_strategy="2norm", d_kv=32, rank_allocation="energy")),
    ("d_kv=16 whitened, rope pca (RoRoPE)", dict(rope_strategy="pca", d_kv=16)),
    ("d_kv=8 whitened, rope pca (RoRoPE)", dict(rope_strategy="pca", d_kv=8)),
    ("partial RoPE only (pca, r=4), no truncation", dict(rope_strategy="pca", d_kv=0, whiten=False)),
]


def run(model, calib_ids: torch.Tensor, ppl_ids: torch.Tensor, out_dir: str, context=2048, stride=512,
        max_windows=0, variants=VARIANTS, progress=True) -> dict:
    device = next(model.parameters()).device
    card = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    res = dict(card=card, context=context, stride=stride, calib_seqs=list(calib_ids.shape), rows=[])
    t = time.time()
    base = perplexity(model, ppl_ids, context, stride, max_windows, progress, "ppl original")
    res["rows"].append(dict(label="original", ppl=base["ppl"], tokens=base["tokens"], kv_ratio=1.0, seconds=time.time() - t))
    res["tokens"] = base["tokens"]
    print(json.dumps(res["rows"][-1]), flush=True)
    t = time.time()
    stats = collect_statistics(model, calib_ids, progress=progress)
    res["calibration_seconds"] = time.time() - t
    for label, kw in variants:
        t = time.time()
        m = copy.deepcopy(model)
        convert_model(m, stats, ConversionOptions(**kw), progress=False)
        conv_s = time.time() - t
        p = perplexity(m, ppl_ids, context, stride, max_windows, progress, label[:30])
        row = dict(label=label, ppl=p["ppl"], kv_ratio=kv_cache_bytes_per_token(m)["ratio"], convert_seconds=conv_s,
                   seconds=time.time() - t, options=kw)
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
        del m
        if device.type == "cuda":
            torch.cuda.empty_cache()
    save_results(out_dir, "oneshot_ppl", card, res, markdown(res))
    return res


def markdown(res: dict) -> str:
    lines = [
        f"# One-shot MHA2MLA conversion of SmolLM2-135M-Instruct: WikiText-2 test perplexity ({res['card']})",
        "",
        f"Sliding window: context {res['context']}, stride {res['stride']}, {res['tokens']:,} tokens scored. "
        f"Calibration: {res['calib_seqs'][0]} sequences x {res['calib_seqs'][1]} tokens of the shared corpus. "
        "r = 4 rope frequencies per KV head (24 rope dims per token and layer) everywhere.",
        "",
        "| conversion | KV cache vs original | perplexity |",
        "|---|---|---|",
    ]
    for r in res["rows"]:
        lines.append(f"| {r['label']} | {100 * r['kv_ratio']:.2f}% | {r['ppl']:.2f} |")
    return "\n".join(lines) + "\n"
