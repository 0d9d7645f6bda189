"""Fine-tuning a converted model (MHA2MLA.md 1.5), nanoGPT-style: data, then
the loop, in the order things happen.

Data: text files, folders, jsonl ("text" field) or pre-tokenized .npy arrays,
tokenized once into a cached uint32 token file read through a memory map (so
a corpus larger than memory works), cut into packed sequences of seq_len+1
tokens; the last `holdout` fraction is held out. The order of training
sequences is a seeded permutation, so a step number is a data position and a
resumed run reads exactly what the interrupted one would have.
"""
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from typing import List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .calibration import corpus_files


# ---------------------------------------------------------------- data ------
def tokenize_corpus(paths: List[str], tokenizer, cache_dir: str, progress: bool = True) -> np.ndarray:
    """All tokens of the corpus as a read-only uint32 memmap, cached by file
    list, sizes, modification times and tokenizer."""
    text_paths = [p for p in paths if not p.endswith(".npy")]
    files = [p for p in paths if p.endswith(".npy")] + (corpus_files(text_paths) if text_paths else [])
    key = hashlib.sha256(json.dumps([(f, os.path.getsize(f), os.path.getmtime(f)) for f in files]
                                    + [getattr(tokenizer, "name_or_path", "none")]).encode()).hexdigest()[:16]
    os.makedirs(cache_dir, exist_ok=True)
    out = os.path.join(cache_dir, f"tokens-{key}.u32")
    if not os.path.exists(out):
        from tqdm.auto import tqdm

        tmp = f"{out}.{os.getpid()}.tmp"  # processes of one torchrun job tokenize the same files at once
        eos = getattr(tokenizer, "eos_token_id", None)
        with open(tmp, "wb") as f:
            for path in tqdm(files, desc="tokenizing", disable=not progress):
                if path.endswith(".npy"):
                    np.load(path, allow_pickle=False).astype(np.uint32).tofile(f)
                    continue
                with open(path, encoding="utf-8", errors="ignore") as src:
                    text = src.read()
                docs = [json.loads(line).get("text", "") for line in text.splitlines() if line.strip()] \
                    if path.endswith(".jsonl") else [text]
                for doc in docs:
                    ids = tokenizer(doc, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
                    np.asarray(ids, dtype=np.uint32).tofile(f)
        os.replace(tmp, out)
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

    def heldout_batches(self, batch: int, max_batches: int):
        """The first batch * max_batches held-out sequences (all: max_batches 0)."""
        n = self.n_held if max_batches <= 0 else min(self.n_held, batch * max_batches)
        for b in range(0, n, batch):
            yield torch.stack([self._seq(self.n_train + i) for i in range(b, min(b + batch, n))])


def text_sequences(path: str, tokenizer, cache_dir: str, seq_len: int) -> PackedData:
    """Every packed sequence of one text (or .npy) file, all held out: the
    loop's --eval-text, scored with heldout_loss(..., max_batches=0)."""
    return PackedData(tokenize_corpus([path], tokenizer, cache_dir, False), seq_len, holdout=1.0)


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
    eval_batches: int = 8
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
    T = cfg.distill_temperature
    kl = F.kl_div(F.log_softmax(logits.float() / T, -1).flatten(0, 1), F.log_softmax(teacher_logits.float() / T, -1).flatten(0, 1),
                  log_target=True, reduction="batchmean") * T * T
    return (1 - cfg.distill_weight) * ce + cfg.distill_weight * kl, ce


@torch.no_grad()
def heldout_loss(model, data: PackedData, cfg: TrainConfig, device, max_batches: Optional[int] = None) -> float:
    """Mean next-token loss over held-out sequences (the first
    cfg.eval_batches batches, or max_batches; 0 = all)."""
    model.eval()
    total, n = 0.0, 0
    for batch in data.heldout_batches(cfg.batch_size, cfg.eval_batches if max_batches is None else max_batches):
        batch = batch.to(device)
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=batch[:, :-1], use_cache=False).logits
        total += float(F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())) * batch.shape[0]
        n += batch.shape[0]
    model.train()
    return total / max(n, 1)


# ------------------------------------------------------- training state ------
STATE = "trainer_state.pt"


def save_checkpoint(model, tokenizer, optimizer_state: dict, step: int, cfg: TrainConfig, path: str,
                    sharded: bool = False) -> None:
    """Model (safetensors) + optimizer state, step and RNG (torch.save of
    tensors and plain values only, loaded back with weights_only=True),
    atomically. sharded: the optimizer state is the name-keyed full state of
    an FSDP run (sharding.gather_full_state), not Optimizer.state_dict()."""
    from .checkpoint import save_mla_model

    def write_state(tmp):
        torch.save(dict(optimizer=optimizer_state, step=step, config=asdict(cfg), rng=torch.get_rng_state(),
                        sharded=sharded), os.path.join(tmp, STATE))

    save_mla_model(model, path, tokenizer, write_more=write_state)


def load_state(path: str) -> Optional[dict]:
    f = os.path.join(path, STATE)
    return torch.load(f, weights_only=True, map_location="cpu") if os.path.isfile(f) else None
