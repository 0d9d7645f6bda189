"""The conversion report: JSON for machines, Markdown for people, and a heat
map of the kept RoPE frequencies."""
import json
import os
from typing import Optional

from .results import pyplot


def latent_widths(dims) -> str:
    """The latent width of the layers in words: one width for all, or the range."""
    lo, hi = min(dims), max(dims)
    return f"latent of {lo} values in every layer" if lo == hi else f"latent of {lo} to {hi} values per layer"


def markdown(rep: dict, for_terminal: bool = False) -> str:
    """The report in Markdown, as conversion_report.md holds it. for_terminal:
    the heat map as a "plot: <path>" line instead of an image link, which a
    terminal shows as noise."""
    kv = rep["kv_cache_bytes_per_token"]
    lines = [
        f"# MHA2MLA conversion report: {rep['source_model']}",
        "",
        "| | original | converted |",
        "|---|---|---|",
        f"| KV cache bytes/token (bf16, all layers) | {kv['original']:,} | {kv['converted']:,} ({100 * kv['ratio']:.2f}%) |",
        f"| attention parameters | {rep['params']['attention_original']:,} | {rep['params']['attention_converted']:,} |",
        f"| total parameters | {rep['params']['total_original']:,} | {rep['params']['total_converted']:,} |",
    ]
    if rep.get("ppl_original") or rep.get("ppl_converted"):
        po, pc = rep.get("ppl_original"), rep.get("ppl_converted")
        ref = po or pc
        lines.append(
            f"| WikiText-2 perplexity (context {ref['context']}, stride {ref['stride']}, {ref['tokens']:,} tokens) "
            f"| {po['ppl']:.2f} | {pc['ppl']:.2f} |" if po and pc else
            f"| WikiText-2 perplexity | {po['ppl'] if po else '-'} | {pc['ppl'] if pc else '-'} |"
        )
    o = rep["options"]
    lines += [
        "",
        f"Reduction of the KV cache: **{100 * (1 - kv['ratio']):.2f}%**.",
    ]
    po, pc = rep.get("ppl_original"), rep.get("ppl_converted")
    if po and pc and pc["ppl"] > 1.1 * po["ppl"]:
        # A one-shot conversion loses much of the quality; a short fine-tune brings it back.
        lines += ["", "The converted model is a starting point: `mha2mla-finetune` recovers its quality "
                  "with a fraction of a percent of the pretraining tokens (README, Fine-tuning)."]
    formats = rep.get("cache_bytes_per_token_by_format")
    if formats:
        lines += ["", "| latent cache format (rope keys in bf16) | bytes/token, all layers | of the original bf16 KV |",
                  "|---|---|---|"]
        lines += [f"| {fmt} | {b:,} | {100 * b / kv['original']:.2f}% |" for fmt, b in formats.items()]
    rotation = ", ".join(r["kind"] + (f" (seed {r['seed']})" if r.get("seed") is not None else "")
                         for r in o.get("latent_rotation") or []) or "none"
    lines += [
        "",
        "## Options",
        "",
        f"rope strategy `{o['rope_strategy']}`, r = {o['r']} per KV head ({o['rope_pairs']} rope pairs per layer), "
        f"d_kv = {o['d_kv']} ({latent_widths(o['latent_dims'])}), svd `{o['svd']}`, "
        f"S placement `{o['s_placement']}`, activation-aware (whitened) SVD: {o['whiten']}, "
        f"rank allocation `{o['rank_allocation']}`, latent rotation: {rotation}.",
    ]
    data = rep.get("data") or {}
    if data.get("calibration") or data.get("perplexity"):
        lines += ["", "Data: " + "; ".join(
            f"{what} {', '.join(paths) if isinstance(paths, list) else paths}"
            for what, paths in (("calibration from", data.get("calibration")), ("perplexity on", data.get("perplexity")))
            if paths) + "."]
    lines += [
        "",
        "## Timings (s)",
        "",
        "| " + " | ".join(rep["timings"]) + " |",
        "|" + "---|" * len(rep["timings"]),
        "| " + " | ".join(f"{v:.1f}" for v in rep["timings"].values()) + " |",
    ]
    if rep.get("heatmap") and for_terminal:
        lines += ["", f"plot: {rep['heatmap']}"]
    elif rep.get("heatmap"):
        lines += ["", f"![kept RoPE frequencies]({os.path.basename(rep['heatmap'])})"]
    return "\n".join(lines) + "\n"


def heatmap(block: dict, head_dim: int, n_kv: int, path: str) -> Optional[str]:
    """Layers x frequencies picture: how many components of each frequency
    keep RoPE. Returns the path, or None without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    import numpy as np

    half = head_dim // 2
    grid = np.zeros((len(block["rope_freq_idx"]), n_kv * half))
    for li, (freqs, comps) in enumerate(zip(block["rope_freq_idx"], block["rope_components"])):
        for i, j in zip(freqs, comps):
            grid[li, j * half + i] = 1
    fig, ax = plt.subplots(figsize=(max(6, n_kv * half / 10), max(3, len(grid) / 5)))
    ax.imshow(grid, aspect="auto", cmap="Blues", interpolation="nearest")
    for j in range(1, n_kv):
        ax.axvline(j * half - 0.5, color="gray", lw=0.5)
    comp = "KV head" if block["rope_strategy"] != "pca" else "principal component"
    ax.set_xlabel(f"{comp} x frequency index (0 = highest frequency)")
    ax.set_ylabel("layer")
    ax.set_title(f"RoPE kept ({block['rope_strategy']}, r={block['r']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(rep: dict, directory: str) -> str:
    md = markdown(rep)
    with open(os.path.join(directory, "conversion_report.json"), "w") as f:
        json.dump(rep, f, indent=2)
    with open(os.path.join(directory, "conversion_report.md"), "w") as f:
        f.write(md)
    return md
