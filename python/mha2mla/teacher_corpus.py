"""Training text sampled from the original model itself.

    python -m mha2mla.teacher_corpus SOURCE --tokens 5000000 --output teacher.npy [--temperature 1.0] ...

The converted model loses most where the fine-tuning corpus is far from
what the original was trained on (on SmolLM2-135M: HellaSwag and PIQA,
everyday commonsense, after training on Wikipedia and Gutenberg). Samples
from the original follow its own distribution, so KL distillation on them
(`finetune.py --data teacher.npy --distill-weight 1 --teacher SOURCE`)
holds the converted model to the original where the original puts its
probability, with no dataset at all.

Each sample starts from one start token (`--start-token`, default the
tokenizer's end-of-text token, the document separator of the corpus files),
is drawn with the given temperature and top-p, and ends at the end-of-text
token or after `--length` tokens. The output is one token stream, each
sample preceded by its start token, as `.npy` (uint16 where the vocabulary
fits). Batches are saved as they finish (`OUTPUT.parts/`), so a killed run
continues where it stopped; a batch's samples depend only on `--seed` and
its index (on one device), so the result does not depend on interruptions.
`--max-minutes` bounds the time instead: no batch starts that the last
batch's duration says would end past it, and the stream holds what was
sampled by then (fewer tokens than `--tokens`, said on the last line)."""
import argparse
import glob
import json
import os
import sys
import time
from typing import List, Optional

import numpy as np
import torch

def sample_batch(model, batch_size: int, length: int, temperature: float, top_p: float, seed: int,
                 start_id: int, end_id: Optional[int]) -> List[np.ndarray]:
    """One batch of samples, each [start, tokens...], cut after its first
    end token; the same seed gives the same samples."""
    device = next(model.parameters()).device
    torch.manual_seed(seed)  # generate() draws from the global generator
    ids = torch.full((batch_size, 1), start_id, dtype=torch.long, device=device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=temperature,
                         top_p=top_p, top_k=0, max_new_tokens=length - 1, min_new_tokens=1,
                         eos_token_id=end_id, pad_token_id=end_id if end_id is not None else start_id)
    rows = []
    for row in out.cpu().numpy():
        new = row[1:]
        if end_id is not None and (new == end_id).any():
            new = new[: int(np.argmax(new == end_id)) + 1]
        rows.append(np.concatenate([[start_id], new]))
    return rows


def generate_corpus(model, output: str, tokens: int, settings: dict, progress: bool = True,
                    max_seconds: Optional[float] = None) -> int:
    """Samples batches until `tokens` tokens exist, saving each batch under
    OUTPUT.parts/ and the whole stream to OUTPUT at the end; returns the
    number of tokens written. Continues an interrupted run with the same
    settings and refuses one with other settings. With `max_seconds`, stops
    early rather than start a batch that would end past it (judged by the
    last batch's duration; at least one batch is always sampled)."""
    from tqdm.auto import tqdm

    parts_dir = output + ".parts"
    os.makedirs(parts_dir, exist_ok=True)
    meta_path = os.path.join(parts_dir, "settings.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            earlier = json.load(f)
        if earlier != settings:
            diff = {k: (earlier.get(k), settings.get(k)) for k in sorted(earlier.keys() | settings.keys())
                    if earlier.get(k) != settings.get(k)}
            raise ValueError(f"{parts_dir} holds an interrupted run with other settings (earlier, now): {diff}; "
                             "delete it or use the same settings")
    else:
        with open(meta_path + ".tmp", "w") as f:
            json.dump(settings, f)
        os.replace(meta_path + ".tmp", meta_path)
    dtype = np.uint16 if settings["vocab_size"] <= 65536 else np.int32
    parts = sorted(glob.glob(os.path.join(parts_dir, "part_*.npy")))
    have = sum(len(np.load(p, mmap_mode="r")) for p in parts)
    bar = tqdm(total=tokens, initial=min(have, tokens), unit="tok", unit_scale=True, desc="sampling",
               disable=not progress)
    index = len(parts)
    t0, last_batch_s = time.monotonic(), 0.0
    while have < tokens:
        if max_seconds is not None and have > 0 and time.monotonic() - t0 + last_batch_s > max_seconds:
            break
        t_batch = time.monotonic()
        batch = np.concatenate(sample_batch(model, settings["batch_size"], settings["length"],
                                            settings["temperature"], settings["top_p"],
                                            settings["seed"] * 1_000_003 + index, settings["start_id"],
                                            settings["end_id"])).astype(dtype)
        path = os.path.join(parts_dir, f"part_{index:06d}.npy")
        np.save(path + ".tmp.npy", batch)
        os.replace(path + ".tmp.npy", path)
        have += len(batch)
        index += 1
        last_batch_s = time.monotonic() - t_batch
        bar.update(min(len(batch), tokens - bar.n))
    bar.close()
    stream = np.concatenate([np.load(p) for p in sorted(glob.glob(os.path.join(parts_dir, "part_*.npy")))])[:tokens]
    np.save(output + ".tmp.npy", stream)
    os.replace(output + ".tmp.npy", output)
    for p in glob.glob(os.path.join(parts_dir, "*")):
        os.remove(p)
    os.rmdir(parts_dir)
    return len(stream)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mha2mla.teacher_corpus", description=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", nargs="?", default=None,
                    help="the original model: a folder, a .gguf file or a hub id (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--output", required=True, help="the .npy token stream to write")
    ap.add_argument("--tokens", type=int, required=True, help="tokens to sample in all")
    ap.add_argument("--length", type=int, default=512, help="most tokens of one sample, its start token included")
    ap.add_argument("--batch-size", type=int, default=256, help="samples drawn at once")
    ap.add_argument("--temperature", type=float, default=1.0,
                    help="1.0 samples the model's own distribution, what KL distillation matches")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling; 1.0 keeps every token")
    ap.add_argument("--start-token", default=None,
                    help="the token every sample starts from (default: the tokenizer's end-of-text token)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="stop sampling after about this long and write what was sampled (at least one batch)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    a = ap.parse_args(argv)
    if not a.output.endswith(".npy"):
        ap.error("--output must end in .npy (finetune.py --data reads it as a token stream)")
    if a.tokens <= 0 or a.length < 2 or a.batch_size < 1 or a.temperature <= 0 or not 0 < a.top_p <= 1 \
            or a.max_minutes is not None and a.max_minutes <= 0:
        ap.error("need --tokens > 0, --length >= 2, --batch-size >= 1, --temperature > 0, 0 < --top-p <= 1 "
                 "and --max-minutes > 0")
    from .source import load_source

    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model, tok, model_id = load_source(a.source, dtype, device)
    model.eval()
    start = a.start_token if a.start_token is not None else tok.eos_token
    start_id = tok.convert_tokens_to_ids(start) if start is not None else None
    if start_id is None or start_id == tok.unk_token_id and start != tok.unk_token:
        print(f"teacher_corpus: {start!r} is not a token of {model_id}'s tokenizer", file=sys.stderr)
        return 2
    settings = dict(source=model_id, length=a.length, batch_size=a.batch_size, temperature=a.temperature,
                    top_p=a.top_p, seed=a.seed, start_id=int(start_id), end_id=tok.eos_token_id,
                    vocab_size=len(tok))
    try:
        t0, resumed = time.time(), os.path.exists(a.output + ".parts")
        n = generate_corpus(model, a.output, a.tokens, settings, progress=not a.quiet,  # generate() needs no grad
                            max_seconds=None if a.max_minutes is None else 60 * a.max_minutes)
    except ValueError as e:
        print(f"teacher_corpus: {e}", file=sys.stderr)
        return 2
    short = f" (--max-minutes {a.max_minutes} reached before --tokens {a.tokens:,})" if n < a.tokens else ""
    rate = "" if resumed else f", {n / max(time.time() - t0, 1e-9):,.0f} tokens/s"  # a resumed call did part
    print(f"{a.output}: {n:,} tokens sampled from {model_id} in {time.time() - t0:.0f} s{rate}{short}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
