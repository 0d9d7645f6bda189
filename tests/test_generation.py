"""Generation through the latent cache equals generation by full forwards."""
import pytest
import torch

pytest.importorskip("transformers")

from mha2mla import ConversionOptions, convert_model  # noqa: E402
from mha2mla.generation import decode_step, generate_greedy, new_cache, prefill  # noqa: E402
from test_conversion import stats_for, tiny_model  # noqa: E402


def greedy_by_full_forward(model, prompt, n):
    ids = prompt.clone()
    out = []
    with torch.no_grad():
        for _ in range(n):
            t = int(model(input_ids=ids[None], use_cache=False).logits[0, -1].argmax())
            out.append(t)
            ids = torch.cat([ids, torch.tensor([t])])
    return out


@pytest.mark.parametrize("kind,rope", [("gqa", "2norm"), ("qwen2", "pca"), ("mha", "high")])
def test_latent_cache_generation_matches_full_forward(kind, rope):
    model = tiny_model(kind)
    convert_model(model, stats_for(model), ConversionOptions(rope_strategy=rope, r=2, d_kv=6), progress=False)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 97, (n,), generator=g) for n in (5, 17, 1)]
    got = generate_greedy(model, prompts, 12, block_size=4)
    want = [greedy_by_full_forward(model, p, 12) for p in prompts]
    assert got == want


def test_decode_logits_match_full_forward():
    """Teacher-forced: the logits of every decode step through the latent
    cache equal those of a full forward over the same tokens."""
    model = tiny_model("gqa")
    convert_model(model, stats_for(model), ConversionOptions(rope_strategy="pca", r=2, d_kv=6), progress=False)
    seqs = [torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(n)) for n in (9, 14)]
    cache = new_cache(model, 64, block_size=4)
    with torch.no_grad():
        full = [model(input_ids=s[None], use_cache=False).logits[0].double() for s in seqs]
        for i in range(2):
            last = prefill(model, cache, i, seqs[i][:5])
            assert float((last.double() - full[i][4]).norm() / full[i][4].norm()) < 1e-5
        for step in range(5, 9):
            logits = decode_step(model, cache, [0, 1], torch.stack([s[step] for s in seqs]))
            for i in range(2):
                ref = full[i][step]
                assert float((logits[i].double() - ref).norm() / ref.norm()) < 1e-5


def test_cache_holds_only_latents():
    model = tiny_model("gqa")
    convert_model(model, stats_for(model), ConversionOptions(r=1, d_kv=4), progress=False)
    cache = new_cache(model, 64)
    # (d_kv * n_kv + 2r * n_kv) per layer, n_kv = 2: the formula of MHA2MLA.md 1.3
    assert cache.bytes_per_token == 2 * (4 * 2 + 2 * 1 * 2) * 4
    assert all(t.shape[-1] == 12 for t in cache.layers)
