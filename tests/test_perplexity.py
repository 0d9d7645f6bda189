"""Sliding-window perplexity: batching windows changes nothing."""
import math

import pytest
import torch

pytest.importorskip("transformers")

from mha2mla.perplexity import perplexity  # noqa: E402
from test_conversion import tiny_model  # noqa: E402


def one_window_at_a_time(model, ids, context, stride):
    """The transformers docs' loop: each window scores the tokens the previous one did not."""
    nll, n, prev_end = 0.0, 0, 0
    for begin in range(0, ids.numel(), stride):
        end = min(begin + context, ids.numel())
        x = ids[begin:end][None]
        targets = x.clone()
        targets[:, : -(end - prev_end)] = -100
        with torch.no_grad():
            logits = model(input_ids=x).logits.double()
        nll += float(torch.nn.functional.cross_entropy(logits[0, :-1], targets[0, 1:], ignore_index=-100, reduction="sum"))
        n += int((targets[0, 1:] != -100).sum())
        prev_end = end
        if end == ids.numel():
            break
    return math.exp(nll / n), n


@pytest.mark.parametrize("length,context,stride,batch", [(101, 32, 12, 3), (64, 32, 32, 8), (37, 64, 16, 4)])
def test_batched_windows_equal_one_at_a_time(length, context, stride, batch):
    model = tiny_model("gqa").double()
    ids = torch.randint(0, 97, (length,), generator=torch.Generator().manual_seed(length))
    ref, n = one_window_at_a_time(model, ids, context, stride)
    out = perplexity(model, ids, context, stride, progress=False, batch_size=batch)
    assert out["tokens"] == n
    assert n == length - 1 or stride == context  # disjoint windows cannot score their first tokens
    assert out["ppl"] == pytest.approx(ref, rel=1e-6)  # cross-entropy in float32
