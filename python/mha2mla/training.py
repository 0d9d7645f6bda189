"""Fine-tuning a converted model (docs/method.md), nanoGPT-style: data, then
the loop, in the order things happen.

Data: text files, folders, jsonl ("text" field) or pre-tokenized .npy arrays,
tokenized once into a cached uint32 token file read through a memory map (so
a corpus larger than memory works), cut into packed sequences of seq_len+1
tokens; the last `holdout` fraction is held out. The token cache is shared
by all runs (user_cache_dir), keyed by the data files and the tokenizer. The
order of training sequences is a seeded permutation, so a step number is a
data position and a resumed run reads exactly what the interrupted one
would have.
"""
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .corpus import corpus_files, documents


# ---------------------------------------------------------------- data ------
def user_cache_dir() -> str:
    """Where caches shared between runs live: $MHA2MLA_CACHE, else
    $XDG_CACHE_HOME/mha2mla, else ~/.cache/mha2mla."""
    if os.environ.get("MHA2MLA_CACHE"):
        return os.path.abspath(os.environ["MHA2MLA_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mha2mla")


def default_token_cache() -> str:
    return os.path.join(user_cache_dir(), "tokens")


def tokenizer_identity(tokenizer) -> list:
    """What the tokens of a text depend on: the tokenizer's name or path, a
    hash of its vocabulary (token -> id) and its end-of-sequence id. None
    (pre-tokenized data only) is an identity of its own."""
    if tokenizer is None:
        return ["none"]
    vocab = sorted(tokenizer.get_vocab().items())
    vocab_hash = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()
    return [type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), vocab_hash,
            getattr(tokenizer, "eos_token_id", None)]


def corpus_key(files: List[str], tokenizer) -> str:
    """Cache key of a token file: each data file's absolute path, size and
    modification time, and the tokenizer's identity."""
    stamp = [(os.path.abspath(f), os.path.getsize(f), os.stat(f).st_mtime_ns) for f in files]
    return hashlib.sha256(json.dumps([stamp, tokenizer_identity(tokenizer)]).encode()).hexdigest()[:20]


def tokenize_corpus(paths: List[str], tokenizer, cache_dir: Optional[str] = None, progress: bool = True,
                    role: str = "training") -> np.ndarray:
    """All tokens of the data (an end-of-sequence token after each document)
    as a read-only uint32 memmap, from the token cache in cache_dir (default:
    default_token_cache()) or tokenized into it. The cache file is written
    under a temporary name and renamed, so a killed run leaves no partial
    cache behind and processes of one torchrun job may tokenize at once."""
    text_paths = [p for p in paths if not p.endswith(".npy")]
    for p in paths:
        if p.endswith(".npy") and not os.path.isfile(p):
            raise FileNotFoundError(f"{role} data not found: {p}")
    files = [p for p in paths if p.endswith(".npy")] + (corpus_files(text_paths, role) if text_paths else [])
    cache_dir = cache_dir or default_token_cache()
    os.makedirs(cache_dir, exist_ok=True)
    out = os.path.join(cache_dir, f"tokens-{corpus_key(files, tokenizer)}.u32")
    if not os.path.exists(out):
        from tqdm.auto import tqdm

        tmp = f"{out}.{os.getpid()}.tmp"  # one temporary file per process: they may finish in any order
        eos = getattr(tokenizer, "eos_token_id", None)
        try:
            with open(tmp, "wb") as f:
                for path in tqdm(files, desc="tokenizing", disable=not progress):
                    if path.endswith(".npy"):
                        np.load(path, allow_pickle=False).astype(np.uint32).tofile(f)
                        continue
                    for doc in documents(path):
                        ids = tokenizer(doc, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
                        np.asarray(ids, dtype=np.uint32).tofile(f)
            os.replace(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return np.memmap(out, dtype=np.uint32, mode="r")


class PackedData:
    """Packed sequences [seq_len + 1] of a token memmap, train/held-out split."""

    def __init__(self, tokens: np.ndarray, seq_len: int, holdout: float = 0.01, seed: int = 0):
        self.tokens, self.seq_len = tokens, seq_len
        n = len(tokens) // (seq_len + 1)
        if n < 2:
            raise ValueError(f"corpus of {len(tokens)} tokens is too small for sequences of {seq_len}")
        self.n_held = max(1, int(n * holdout))
        self.n_train = n - self.n_held
        self.seed = seed
        self._perm = (None, None)  # (epoch, its permutation): one draw per epoch, not per sequence

    def _order(self, epoch: int) -> torch.Tensor:
        if self._perm[0] != epoch:
            self._perm = (epoch, torch.randperm(self.n_train, generator=torch.Generator().manual_seed(self.seed + epoch)))
        return self._perm[1]

    def _seq(self, i: int) -> torch.Tensor:
        s = i * (self.seq_len + 1)
        return torch.from_numpy(self.tokens[s : s + self.seq_len + 1].astype(np.int64))

    def train_batch(self, position: int, batch: int) -> torch.Tensor:
        """Sequences position .. position+batch-1 of the seeded endless order."""
        out = []
        for k in range(position, position + batch):
            epoch, j = divmod(k, self.n_train)
            out.append(self._seq(int(self._order(epoch)[j])))
        return torch.stack(out)

    def heldout_batches(self, batch: int, max_sequences: int = 0):
        """The first max_sequences held-out sequences (all: 0), batch at a time."""
        n = self.n_held if max_sequences <= 0 else min(self.n_held, max_sequences)
        for b in range(0, n, batch):
            yield torch.stack([self._seq(self.n_train + i) for i in range(b, min(b + batch, n))])


def text_sequences(path: str, tokenizer, seq_len: int, cache_dir: Optional[str] = None) -> PackedData:
    """Every packed sequence of one text (or .npy) file, all held out: the
    loop's --eval-text, scored with eval_text_loss."""
    return PackedData(tokenize_corpus([path], tokenizer, cache_dir, False, role="--eval-text"), seq_len, holdout=1.0)


# -------------------------------------------------------------- recipe ------
OBJECTIVES = ("lm", "attention")  # TrainConfig.objective
TRAIN_SCOPES = ("all", "attention")  # TrainConfig.train, under objective "lm"


@dataclass
class TrainConfig:
    lr: float = 1e-4
    new_proj_lr_mult: float = 1.0  # lr multiplier of kv_down, k_up, v_up, k_rope_proj, q_rope_map
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.95)
    clip: float = 1.0
    warmup_steps: int = 50
    decay_frac: float = 0.2  # final fraction of steps with 1-sqrt decay
    max_steps: int = 1000
    batch_size: int = 8  # sequences per micro-batch per process
    grad_accum: int = 1
    seq_len: int = 1024
    train: str = "all"  # or "attention": attention projections and norms only (TRAIN_SCOPES)
    # "lm": next-token cross-entropy and/or KL to the teacher's logits (distill_weight);
    # "attention": attention transfer (attention_transfer.py), each layer's attention
    # output matched to the teacher's; trains attention weights only
    objective: str = "lm"
    distill_weight: float = 0.0  # 0 = cross-entropy only, 1 = KL to the teacher only
    distill_temperature: float = 1.0
    eval_every: int = 100
    eval_batches: int = 8  # held-out loss: the first eval_batches x batch_size held-out sequences
    eval_text_tokens: int = 65536  # --eval-text: tokens scored per evaluation (whole sequences; 0 = the whole file)
    log_every: int = 10  # steps between writes of the per-step log (reading losses back waits for the GPU)
    save_every: int = 200
    seed: int = 0


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Warmup, constant, then 1-sqrt decay over the last decay_frac of steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_start = int(cfg.max_steps * (1 - cfg.decay_frac))
    if step < decay_start:
        return cfg.lr
    frac = (step - decay_start) / max(1, cfg.max_steps - decay_start)
    return cfg.lr * (1 - math.sqrt(min(1.0, frac)))


NEW_PROJECTIONS = ("kv_down", "k_up", "v_up", "k_rope_proj", "q_rope_map")


def param_groups(model, cfg: TrainConfig):
    groups = {"new": [], "decay": [], "no_decay": []}
    if cfg.objective not in OBJECTIVES or cfg.train not in TRAIN_SCOPES:
        raise ValueError(f"unknown objective {cfg.objective!r} or train {cfg.train!r}")
    for name, p in model.named_parameters():
        if cfg.objective == "attention":  # only attention weights see a loss
            train = "self_attn" in name
        else:
            train = cfg.train == "all" or "self_attn" in name or "norm" in name
        p.requires_grad_(train)
        if not train:
            continue
        if any(k in name for k in NEW_PROJECTIONS):
            groups["new"].append(p)
        elif p.dim() < 2 or "norm" in name:
            groups["no_decay"].append(p)
        else:
            groups["decay"].append(p)
    return [
        dict(params=groups["decay"], weight_decay=cfg.weight_decay, lr_mult=1.0),
        dict(params=groups["new"], weight_decay=cfg.weight_decay, lr_mult=cfg.new_proj_lr_mult),
        dict(params=groups["no_decay"], weight_decay=0.0, lr_mult=1.0),
    ]


def loss_fn(logits, targets, teacher_logits, cfg: TrainConfig):
    ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    if teacher_logits is None or cfg.distill_weight == 0:
        return ce, ce
    temp = cfg.distill_temperature
    kl = F.kl_div(F.log_softmax(logits.float() / temp, -1).flatten(0, 1),
                  F.log_softmax(teacher_logits.float() / temp, -1).flatten(0, 1),
                  log_target=True, reduction="batchmean") * temp * temp
    return (1 - cfg.distill_weight) * ce + cfg.distill_weight * kl, ce


@torch.no_grad()
def mean_loss(model, data: PackedData, batch_size: int, device, max_sequences: int = 0, progress: bool = False,
              desc: str = "evaluation") -> Tuple[float, int]:
    """(mean next-token loss, tokens scored) over the first max_sequences
    held-out sequences of data (0: all), batch_size at a time, with a
    progress bar of tokens when progress is set."""
    from tqdm.auto import tqdm

    n_seqs = data.n_held if max_sequences <= 0 else min(data.n_held, max_sequences)
    model.eval()
    loss_sum, n_tokens = 0.0, 0
    with tqdm(total=n_seqs * data.seq_len, desc=desc, unit="tok", unit_scale=True, leave=False,
              disable=not progress) as bar:
        for batch in data.heldout_batches(batch_size, n_seqs):
            batch = batch.to(device)
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(input_ids=batch[:, :-1], use_cache=False).logits
            scored = batch[:, 1:].numel()
            loss_sum += float(F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())) * scored
            n_tokens += scored
            bar.update(scored)
    model.train()
    return loss_sum / max(n_tokens, 1), n_tokens


def heldout_loss(model, data: PackedData, cfg: TrainConfig, device, progress: bool = False) -> float:
    """Mean next-token loss over the first cfg.eval_batches batches of the
    training data's held-out split."""
    return mean_loss(model, data, cfg.batch_size, device, cfg.eval_batches * cfg.batch_size, progress,
                     "held-out loss")[0]


def eval_text_loss(model, text: PackedData, cfg: TrainConfig, device, progress: bool = False) -> Tuple[float, int]:
    """(mean next-token loss, tokens scored) over the first
    cfg.eval_text_tokens tokens of an --eval-text (whole sequences of
    cfg.seq_len, at least one; 0: the whole file)."""
    cap = cfg.eval_text_tokens
    return mean_loss(model, text, cfg.batch_size, device, 0 if cap <= 0 else max(1, cap // cfg.seq_len), progress,
                     "eval text")


# ------------------------------------------------------- training state ------
STATE = "trainer_state.pt"


def save_checkpoint(model, tokenizer, optimizer_state: dict, step: int, cfg: TrainConfig, path: str,
                    sharded: bool = False, run_id: str = "") -> None:
    """Model (safetensors) + optimizer state, step and RNG (torch.save of
    tensors and plain values only, loaded back with weights_only=True),
    atomically, replacing the checkpoint at path (the run's own). sharded:
    the optimizer state is the name-keyed full state of an FSDP run
    (sharding.gather_full_state), not Optimizer.state_dict(). run_id: the
    run's run.json id, which --resume checks."""
    from .checkpoint import save_mla_model

    def write_state(tmp):
        torch.save(dict(optimizer=optimizer_state, step=step, config=asdict(cfg), rng=torch.get_rng_state(),
                        sharded=sharded, run_id=run_id), os.path.join(tmp, STATE))

    save_mla_model(model, path, tokenizer, write_more=write_state, overwrite=True)


def load_state(path: str) -> Optional[dict]:
    f = os.path.join(path, STATE)
    return torch.load(f, weights_only=True, map_location="cpu") if os.path.isfile(f) else None
