"""Sliding-window perplexity (the transformers docs' protocol): windows of
`context` tokens every `stride` tokens, each scoring only the tokens not
scored by the previous window."""
import math

import torch
from tqdm.auto import tqdm


def tokenize_file(tokenizer, path: str) -> torch.Tensor:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, context: int = 2048, stride: int = 512, max_windows: int = 0,
               progress: bool = True, desc: str = "perplexity") -> dict:
    """Returns {ppl, nll, tokens, windows, context, stride}. max_windows > 0
    stops early (a quick estimate over the first windows)."""
    device = next(model.parameters()).device
    nll_sum, n_tokens, prev_end, windows = 0.0, 0, 0, 0
    starts = list(range(0, ids.numel(), stride))
    if max_windows > 0:
        starts = starts[:max_windows]
    for begin in tqdm(starts, desc=desc, disable=not progress):
        end = min(begin + context, ids.numel())
        target_len = end - prev_end
        if target_len <= 0:
            break
        x = ids[begin:end].unsqueeze(0).to(device)
        logits = model(input_ids=x, use_cache=False).logits.float()
        targets = x.clone()
        targets[:, :-target_len] = -100
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], targets[0, 1:], ignore_index=-100, reduction="sum")
        scored = int((targets[0, 1:] != -100).sum())
        nll_sum += float(loss)
        n_tokens += scored
        prev_end = end
        windows += 1
        if end == ids.numel():
            break
    nll = nll_sum / max(n_tokens, 1)
    return dict(ppl=math.exp(nll), nll=nll, tokens=n_tokens, windows=windows, context=context, stride=stride)
