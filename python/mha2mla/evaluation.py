"""Zero-shot multiple-choice evaluation by log-likelihood, as
lm-evaluation-harness defines it: every choice is a continuation of a context;
acc takes the choice of highest summed log-likelihood, acc_norm the highest
log-likelihood per character of the continuation. Data: ../shared/data/mc
(see its SOURCES.md); prompts follow lm-eval's task definitions (MMLU in the
cloze form the paper used)."""
import bz2
import csv
import errno
import glob
import json
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from tqdm.auto import tqdm

from .shared_data import shared_path

MC_ROOT = shared_path("mc")


class DataFormatError(ValueError):
    """A data file that does not have the expected format (names file and line)."""


@dataclass
class Item:
    """One question: candidate (context, continuation) pairs and the gold index."""
    pairs: List[Tuple[str, str]]
    gold: int


def _jsonl(path: str):
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataFormatError(f"{path}:{n}: not JSON ({e.msg})") from None


def _field(path, n, obj, *keys):
    try:
        for k in keys:
            obj = obj[k]
        return obj
    except (KeyError, IndexError, TypeError):
        raise DataFormatError(f"{path}:{n}: missing field {'.'.join(map(str, keys))}") from None


def load_arc(path: str) -> List[Item]:
    items = []
    for n, d in _jsonl(path):
        choices = _field(path, n, d, "question", "choices")
        labels = [str(_field(path, n, c, "label")) for c in choices]
        key = str(_field(path, n, d, "answerKey"))
        if key not in labels:  # items use A-D, 1-4, or 3/5 choices: map the item's own labels
            raise DataFormatError(f"{path}:{n}: answerKey {key!r} is not one of the labels {labels}")
        ctx = f"Question: {_field(path, n, d, 'question', 'stem')}\nAnswer:"
        items.append(Item([(ctx, " " + _field(path, n, c, "text")) for c in choices], labels.index(key)))
    return items


def load_piqa(path: str, labels_path: str) -> List[Item]:
    with open(labels_path) as f:
        labels = [line.strip() for line in f if line.strip()]
    items = []
    for n, d in _jsonl(path):
        if n > len(labels) or labels[n - 1] not in ("0", "1"):
            raise DataFormatError(f"{labels_path}:{n}: no 0/1 label for {path}:{n}")
        ctx = f"Question: {_field(path, n, d, 'goal')}\nAnswer:"
        items.append(Item([(ctx, " " + _field(path, n, d, "sol1")), (ctx, " " + _field(path, n, d, "sol2"))],
                          int(labels[n - 1])))
    return items


def load_hellaswag(path: str) -> List[Item]:
    """llama.cpp's 6-line format (context, gold, 4 endings), already
    preprocessed as lm-eval does."""
    opener = bz2.open if path.endswith(".bz2") else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise DataFormatError(f"{path}:{len(lines)}: {len(lines)} lines is not a whole number of 6-line tasks")
    items = []
    for i in range(0, len(lines), 6):
        if lines[i + 1].strip() not in ("0", "1", "2", "3"):
            raise DataFormatError(f"{path}:{i + 2}: gold label must be 0-3, got {lines[i + 1]!r}")
        items.append(Item([(lines[i], " " + e) for e in lines[i + 2 : i + 6]], int(lines[i + 1])))
    return items


def load_winogrande(path: str) -> List[Item]:
    """Partial scoring: the option fills the blank in the context, and the
    shared rest of the sentence is the continuation that is scored."""
    items = []
    for n, d in _jsonl(path):
        s = _field(path, n, d, "sentence")
        if "_" not in s:
            raise DataFormatError(f"{path}:{n}: sentence has no blank '_'")
        i = s.index("_")
        rest = " " + s[i + 1 :].strip()
        opts = [_field(path, n, d, "option1"), _field(path, n, d, "option2")]
        ans = str(_field(path, n, d, "answer"))
        if ans not in ("1", "2"):
            raise DataFormatError(f"{path}:{n}: answer must be '1' or '2', got {ans!r}")
        items.append(Item([(s[:i] + o, rest) for o in opts], int(ans) - 1))
    return items


def load_openbookqa(path: str) -> List[Item]:
    items = []
    for n, d in _jsonl(path):
        choices = _field(path, n, d, "question", "choices")
        labels = [c["label"] for c in choices]
        key = _field(path, n, d, "answerKey")
        if key not in labels:
            raise DataFormatError(f"{path}:{n}: answerKey {key!r} is not one of the labels {labels}")
        ctx = _field(path, n, d, "question", "stem")
        items.append(Item([(ctx, " " + c["text"]) for c in choices], labels.index(key)))
    return items


def load_mmlu(folder: str) -> List[Item]:
    """MMLU test CSVs (question, A, B, C, D, answer) in the cloze form."""
    if not os.path.isdir(folder):  # missing data, as a missing file of another task is
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), folder)
    files = sorted(glob.glob(os.path.join(folder, "*.csv")))
    if not files:
        raise DataFormatError(f"{folder}: no MMLU .csv files")
    items = []
    for path in files:
        with open(path, newline="", encoding="utf-8") as f:
            for n, row in enumerate(csv.reader(f), 1):
                if len(row) != 6 or row[5] not in "ABCD" or not row[5]:
                    raise DataFormatError(f"{path}:{n}: expected question, 4 choices and an answer A-D")
                ctx = f"Question: {row[0]}\nAnswer:"
                items.append(Item([(ctx, " " + c) for c in row[1:5]], "ABCD".index(row[5])))
    return items


def task_loaders(root: str = MC_ROOT) -> Dict[str, Callable[[], List[Item]]]:
    j = lambda *p: os.path.join(root, *p)  # noqa: E731
    return {
        "arc_easy": lambda: load_arc(j("arc_easy", "ARC-Easy-Test.jsonl")),
        "arc_challenge": lambda: load_arc(j("arc_challenge", "ARC-Challenge-Test.jsonl")),
        "piqa": lambda: load_piqa(j("piqa", "valid.jsonl"), j("piqa", "valid-labels.lst")),
        "hellaswag": lambda: load_hellaswag(j("hellaswag", "hellaswag_val_full.txt.bz2")),
        "winogrande": lambda: load_winogrande(j("winogrande", "dev.jsonl")),
        "openbookqa": lambda: load_openbookqa(j("openbookqa", "test.jsonl")),
        "mmlu": lambda: load_mmlu(j("mmlu", "test")),
    }


TASKS = tuple(task_loaders("."))


def _split_space(context: str, continuation: str) -> Tuple[str, str]:
    """lm-eval's split: trailing spaces of the context move to the continuation."""
    n_space = len(context) - len(context.rstrip())
    if n_space:
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    return context, continuation


def encode_pairs(tokenizer, pairs: List[Tuple[str, str]]) -> List[Tuple[List[int], List[int]]]:
    """(context ids, continuation ids) of each pair, lm-eval's way: the
    continuation's tokens are those of context+continuation past the
    context's. One batched tokenizer call for the wholes and one for the
    distinct contexts (the choices of a question share theirs)."""
    split = [_split_space(c, t) for c, t in pairs]
    contexts = sorted({c for c, _ in split})
    ctx_len = dict(zip(contexts, map(len, tokenizer(contexts, add_special_tokens=False)["input_ids"]))) if contexts else {}
    wholes = tokenizer([c + t for c, t in split], add_special_tokens=False)["input_ids"] if split else []
    return [(w[: ctx_len[c]], w[ctx_len[c] :]) for (c, _), w in zip(split, wholes)]


def encode_pair(tokenizer, context: str, continuation: str) -> Tuple[List[int], List[int]]:
    return encode_pairs(tokenizer, [(context, continuation)])[0]


@torch.no_grad()
def loglikelihoods(model, tokenizer, pairs: List[Tuple[str, str]], batch_size: int = 16, max_length: int = 2048,
                   progress: bool = False, desc: str = "scoring", encoded=None, cache_dtype=None) -> List[float]:
    """Summed log-probability of each continuation given its context.
    Longest first, so a batch pads little; the log-softmax is taken on the
    device and only at continuation positions (the full [batch, length,
    vocab] log-probabilities are never materialised or copied to the host).
    `encoded`: encode_pairs(tokenizer, pairs), when already at hand.
    `cache_dtype` (a converted model only): score the way generation does,
    reading the latents back from a LatentKVCache of that format
    (perplexity.logits_through_cache); the right padding of a batch comes
    after every scored position, so causal attention keeps it out."""
    from .perplexity import logits_through_cache

    device = next(model.parameters()).device
    enc = []
    for (ctx, _), (c, t) in zip(pairs, encoded if encoded is not None else encode_pairs(tokenizer, pairs)):
        if not t:
            raise ValueError(f"empty continuation for context {ctx[:60]!r}")
        enc.append(((c + t)[-(max_length + 1) :], len(t)))
    order = sorted(range(len(enc)), key=lambda i: -len(enc[i][0]))
    out = [0.0] * len(enc)
    for s in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress):
        idx = order[s : s + batch_size]
        width = max(len(enc[i][0]) for i in idx) - 1
        inp = torch.zeros(len(idx), width, dtype=torch.long)
        rows, cols, targets, owner = [], [], [], []
        for row, i in enumerate(idx):
            seq, n_cont = enc[i]
            L = len(seq) - 1
            inp[row, :L] = torch.tensor(seq[:-1])
            rows += [row] * n_cont
            cols += range(L - n_cont, L)
            targets += seq[-n_cont:]
            owner += [row] * n_cont
        if cache_dtype is None:
            logits = model(input_ids=inp.to(device), use_cache=False).logits
        else:
            logits = logits_through_cache(model, inp.to(device), cache_dtype)
        picked = logits[torch.tensor(rows, device=device), torch.tensor(cols, device=device)].float()
        tok_lp = picked.log_softmax(-1).gather(1, torch.tensor(targets, device=device)[:, None])[:, 0]
        sums = torch.zeros(len(idx), dtype=torch.float64, device=device).index_add_(
            0, torch.tensor(owner, device=device), tok_lp.double())
        for row, i in enumerate(sums.cpu().tolist()):
            out[idx[row]] = i
    return out


def choice_length(continuation: str) -> int:
    """lm-eval's acc_norm divides by the characters of the choice itself,
    without the " " target delimiter our items put in front of it (counting
    it flipped 1 of 250 ARC-Easy and PIQA items against lm_eval)."""
    return max(1, len(continuation) - (1 if continuation.startswith(" ") else 0))


def evaluate_items(model, tokenizer, items: List[Item], batch_size: int = 16, progress: bool = False,
                   desc: str = "", encoded=None, cache_dtype=None) -> dict:
    pairs = [p for it in items for p in it.pairs]
    lls = loglikelihoods(model, tokenizer, pairs, batch_size, progress=progress, desc=desc, encoded=encoded,
                         cache_dtype=cache_dtype)
    hits, hits_norm = [], []
    k = 0
    for it in items:
        ll = lls[k : k + len(it.pairs)]
        k += len(it.pairs)
        lengths = [choice_length(cont) for _, cont in it.pairs]
        hits.append(int(max(range(len(ll)), key=lambda i: ll[i]) == it.gold))
        hits_norm.append(int(max(range(len(ll)), key=lambda i: ll[i] / lengths[i]) == it.gold))
    n = max(len(items), 1)
    # per-item hits, as "0"/"1" strings in item order: two models scored on the
    # same items can then be compared item by item (paired_difference)
    return dict(acc=100 * sum(hits) / n, acc_norm=100 * sum(hits_norm) / n, n=len(items),
                hits="".join(map(str, hits)), hits_norm="".join(map(str, hits_norm)))


# The paper's six-task commonsense average (Table 1): ARC counts once as the
# mean of Easy and Challenge; WinoGrande by acc, the others by acc_norm.
# task -> (metric, weight in the average)
SIX_TASK_WEIGHTS = {"arc_easy": ("acc_norm", 1 / 12), "arc_challenge": ("acc_norm", 1 / 12),
                    "piqa": ("acc_norm", 1 / 6), "hellaswag": ("acc_norm", 1 / 6), "openbookqa": ("acc_norm", 1 / 6),
                    "mmlu": ("acc_norm", 1 / 6), "winogrande": ("acc", 1 / 6)}


def six_task_average(scores: Dict[str, dict]) -> Optional[float]:
    if not all(t in scores for t in SIX_TASK_WEIGHTS):
        return None
    return sum(w * scores[t][metric] for t, (metric, w) in SIX_TASK_WEIGHTS.items())


def paired_difference(scores: Dict[str, dict], baseline: Dict[str, dict]) -> Tuple[float, float]:
    """Six-task average of `scores` minus that of `baseline`, and the standard
    error of that difference, item by item: both models answered the same
    items, so the error comes from the items on which they disagree, far
    fewer than all (an unpaired error counts every item's variance twice).
    Per task, the variance of the mean of the per-item differences; the tasks
    are independent samples, so their weighted variances add."""
    diff = var = 0.0
    for t, (metric, w) in SIX_TASK_WEIGHTS.items():
        key = "hits" if metric == "acc" else "hits_norm"
        a, b = (s.get(t, {}).get(key) for s in (scores, baseline))
        if a is None or b is None:
            raise ValueError(f"{t}: no per-item hits (evaluations from before per-item scores were saved)")
        if len(a) != len(b):
            raise ValueError(f"{t}: {len(a)} items against {len(b)}: not the same items")
        d = [int(x) - int(y) for x, y in zip(a, b)]
        n = len(d)
        mean = sum(d) / n
        diff += w * 100 * mean
        var += w * w * 1e4 * (sum((x - mean) ** 2 for x in d) / max(n - 1, 1)) / n
    return diff, var ** 0.5
