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


def _windows(n_ids: int, context: int, stride: int, max_windows: int) -> list:
    """(begin, end, tokens scored at the end of the window) of each window."""
    windows, prev_end = [], 0
    for begin in range(0, n_ids, stride):
        end = min(begin + context, n_ids)
        if end - prev_end <= 0 or (max_windows > 0 and len(windows) == max_windows):
            break
        windows.append((begin, end, end - prev_end))
        prev_end = end
        if end == n_ids:
            break
    return windows


def _sliding_nll(ids, windows, window_logits, device, batch_size, progress, desc):
    """Summed negative log-likelihood and token count of the windows' scored
    tokens. Windows of equal length go to window_logits(x) [batch, length]
    batch_size at a time; each scores its own tokens."""
    nll_sum, n_tokens = 0.0, 0
    bar = tqdm(total=len(windows), desc=desc, disable=not progress)
    i = 0
    while i < len(windows):
        length = windows[i][1] - windows[i][0]
        group = [w for w in windows[i : i + batch_size] if w[1] - w[0] == length]  # the last window may be shorter
        x = torch.stack([ids[b:e] for b, e, _ in group]).to(device)
        logits = window_logits(x)
        for row, (_, _, scored) in enumerate(group):
            n = min(scored, length - 1)  # a window's first token has nothing to predict it
            # logits at position p predict token p + 1: the window's last n tokens
            nll_sum += float(torch.nn.functional.cross_entropy(logits[row, -n - 1 : -1].float(), x[row, -n:],
                                                               reduction="sum"))
            n_tokens += n
        i += len(group)
        bar.update(len(group))
    bar.close()
    return nll_sum, n_tokens


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, context: int = 2048, stride: int = 512, max_windows: int = 0,
               progress: bool = True, desc: str = "perplexity", batch_size: int = 8) -> dict:
    """Returns {ppl, nll, tokens, windows, context, stride}. max_windows > 0
    stops early (a quick estimate over the first windows). Windows of equal
    length go through the model batch_size at a time; each scores its own
    tokens, so the result is that of one window per forward."""
    device = next(model.parameters()).device
    windows = _windows(ids.numel(), context, stride, max_windows)
    nll_sum, n_tokens = _sliding_nll(ids, windows, lambda x: model(input_ids=x, use_cache=False).logits, device,
                                     batch_size, progress, desc)
    nll = nll_sum / max(n_tokens, 1)
    return dict(ppl=math.exp(nll), nll=nll, tokens=n_tokens, windows=len(windows), context=context, stride=stride)


@torch.no_grad()
def logits_through_cache(model, x: torch.Tensor, cache_dtype="auto", chunk: int = 64) -> torch.Tensor:
    """Logits [batch, length, vocab] of x [batch, length] computed the way
    generation computes them: the first token is the prompt (a prefill),
    every later token goes through LatentKVCache decode steps of `chunk`
    tokens (causal among themselves), so every score reads the latents back
    from a cache of `cache_dtype` ("auto", "fp8", "int4", ...): quantized as
    written, dequantized by the attention kernel."""
    from .cache import LatentKVCache

    cache = LatentKVCache(model, initial_tokens=x.shape[1], cache_dtype=cache_dtype)
    parts = [model(input_ids=x[:, :1], **cache.as_kwargs()).logits]
    for start in range(1, x.shape[1], chunk):
        parts.append(model(input_ids=x[:, start : start + chunk], **cache.as_kwargs()).logits)
    return torch.cat(parts, 1)


@torch.no_grad()
def perplexity_through_cache(model, ids: torch.Tensor, context: int = 2048, stride: int = 512, max_windows: int = 0,
                             progress: bool = True, desc: str = "perplexity", batch_size: int = 8,
                             cache_dtype="auto", chunk: int = 64) -> dict:
    """perplexity() scored the way generation computes logits
    (logits_through_cache: a one-token prefill per window, then decode steps
    of `chunk` tokens that read the latents back from a cache of
    `cache_dtype`). The result adds cache_dtype, chunk and the cache's
    bytes_per_token."""
    from .cache import LatentKVCache

    device = next(model.parameters()).device
    windows = _windows(ids.numel(), context, stride, max_windows)
    bytes_per_token = LatentKVCache(model, cache_dtype=cache_dtype).bytes_per_token()

    def window_logits(x):
        return logits_through_cache(model, x, cache_dtype, chunk).float()

    nll_sum, n_tokens = _sliding_nll(ids, windows, window_logits, device, batch_size, progress, desc)
    nll = nll_sum / max(n_tokens, 1)
    return dict(ppl=math.exp(nll), nll=nll, tokens=n_tokens, windows=len(windows), context=context, stride=stride,
                cache_dtype=cache_dtype, chunk=chunk, bytes_per_token=bytes_per_token)
