"""Multiple-choice scoring on a character-level toy LM whose preferences are
known, and the data loaders' handling of real and malformed files."""
import json
import os

import numpy as np
import pytest
import torch

from mha2mla.evaluation import (MC_ROOT, DataFormatError, Item, encode_pair, evaluate_items, load_arc,
                                load_hellaswag, load_winogrande, loglikelihoods)


class CharTokenizer:
    """One token per character (ids = code points mod 128); takes a text or a
    list of texts, as Hugging Face tokenizers do."""

    def __call__(self, text, add_special_tokens=False):
        if isinstance(text, list):
            return {"input_ids": [self(t)["input_ids"] for t in text]}
        return {"input_ids": [ord(c) % 128 for c in text]}


class PreferringLM(torch.nn.Module):
    """Next-token logits depend only on the current token: after any token,
    `favourite` gets +8, everything else 0."""

    def __init__(self, favourite: str):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(128))
        with torch.no_grad():
            self.bias[ord(favourite)] = 8.0

    def forward(self, input_ids, use_cache=False):
        logits = self.bias.expand(*input_ids.shape, 128)

        class Out:
            pass

        o = Out()
        o.logits = logits
        return o


def test_loglikelihood_is_the_continuations_sum():
    lm, tok = PreferringLM("a"), CharTokenizer()
    ll = loglikelihoods(lm, tok, [("xy", "aa"), ("xy", "ab"), ("q", "a")], batch_size=2)
    la = float(torch.log_softmax(lm.bias, 0)[ord("a")])
    lb = float(torch.log_softmax(lm.bias, 0)[ord("b")])
    assert ll == pytest.approx([2 * la, la + lb, la], rel=1e-5)


def test_scoring_picks_the_overwhelmingly_likely_choice():
    items = [Item([("Q:", " bbbb"), ("Q:", " aaaa"), ("Q:", " cccc")], gold=1)]
    r = evaluate_items(PreferringLM("a"), CharTokenizer(), items)
    assert r["acc"] == 100 and r["acc_norm"] == 100
    r = evaluate_items(PreferringLM("b"), CharTokenizer(), items)
    assert r["acc"] == 0


def test_items_hits_are_recorded_in_item_order():
    items = [Item([("Q:", " bbbb"), ("Q:", " aaaa")], gold=1), Item([("Q:", " aaaa"), ("Q:", " bbbb")], gold=1),
             Item([("Q:", " b"), ("Q:", " aaaaaaaaab")], gold=1)]
    r = evaluate_items(PreferringLM("a"), CharTokenizer(), items)
    assert r["hits"] == "100" and r["hits_norm"] == "101"
    assert r["acc"] == pytest.approx(100 / 3) and r["acc_norm"] == pytest.approx(200 / 3)


def test_acc_norm_divides_by_characters():
    # favourite 'a': " b" costs two unlikely tokens; " aaaaaaaaab" costs the
    # same two plus nine likely ones, so it is less likely in total (acc picks
    # " b") but far more likely per character (acc_norm picks it).
    items = [Item([("Q", " b"), ("Q", " aaaaaaaaab")], gold=1)]
    r = evaluate_items(PreferringLM("a"), CharTokenizer(), items)
    assert r["acc"] == 0 and r["acc_norm"] == 100


def test_acc_norm_length_excludes_the_target_delimiter():
    from mha2mla.evaluation import choice_length

    assert choice_length(" aaaa") == 4 and choice_length("aaaa") == 4 and choice_length(" ") == 1


def test_encode_pair_moves_trailing_space():
    c, t = encode_pair(CharTokenizer(), "Answer: ", "yes")
    assert len(c) == len("Answer:") and len(t) == len(" yes")


def test_malformed_files_name_file_and_line(tmp_path):
    p = tmp_path / "arc.jsonl"
    good = {"question": {"stem": "s", "choices": [{"text": "x", "label": "1"}, {"text": "y", "label": "2"}]}, "answerKey": "2"}
    p.write_text(json.dumps(good) + "\n" + "{not json\n")
    with pytest.raises(DataFormatError, match=r"arc.jsonl:2: not JSON"):
        load_arc(str(p))
    bad = dict(good, answerKey="C")
    p.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataFormatError, match=r"arc.jsonl:2: answerKey 'C'"):
        load_arc(str(p))
    w = tmp_path / "w.jsonl"
    w.write_text(json.dumps({"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"}) + "\n")
    with pytest.raises(DataFormatError, match=r"w.jsonl:1: sentence has no blank"):
        load_winogrande(str(w))
    h = tmp_path / "h.txt"
    h.write_text("ctx\n7\na\nb\nc\nd\n")
    with pytest.raises(DataFormatError, match=r"h.txt:2: gold label"):
        load_hellaswag(str(h))


def test_label_mapping_uses_each_items_labels(tmp_path):
    p = tmp_path / "arc.jsonl"
    d = {"question": {"stem": "s", "choices": [{"text": t, "label": str(i + 1)} for i, t in enumerate("xyz")]}, "answerKey": "3"}
    p.write_text(json.dumps(d) + "\n")
    items = load_arc(str(p))
    assert items[0].gold == 2 and len(items[0].pairs) == 3


@pytest.mark.skipif(not os.path.isdir(MC_ROOT), reason="../shared/data/mc not present")
def test_real_files_load_with_their_documented_counts():
    from mha2mla.evaluation import task_loaders

    counts = {"arc_easy": 2376, "arc_challenge": 1172, "piqa": 1838, "winogrande": 1267, "openbookqa": 500,
              "hellaswag": 10042, "mmlu": 14042}
    loaders = task_loaders()
    for task, n in counts.items():
        assert len(loaders[task]()) == n, task


def random_scores(rng, sizes, p, baseline=None, agree=0.8):
    """Per-task hits for the six tasks; with a baseline, each item copies the
    baseline's answer with probability `agree` (as a fine-tuned model does)."""
    scores = {}
    for t, n in sizes.items():
        hs = {}
        for key in ("hits", "hits_norm"):
            if baseline is None:
                h = (rng.random(n) < p).astype(int)
            else:
                b = np.array([int(c) for c in baseline[t][key]])
                h = np.where(rng.random(n) < agree, b, (rng.random(n) < p).astype(int))
            hs[key] = "".join(map(str, h))
        scores[t] = dict(acc=100 * hs["hits"].count("1") / n, acc_norm=100 * hs["hits_norm"].count("1") / n, n=n, **hs)
    return scores


SIZES = dict(arc_easy=237, arc_challenge=117, piqa=183, hellaswag=1004, openbookqa=50, mmlu=1404, winogrande=126)


def test_paired_difference_matches_a_float64_computation():
    from mha2mla.evaluation import SIX_TASK_WEIGHTS, paired_difference, six_task_average

    rng = np.random.default_rng(7)
    base = random_scores(rng, SIZES, 0.42)
    model = random_scores(rng, SIZES, 0.38, baseline=base)
    diff, se = paired_difference(model, base)
    assert diff == pytest.approx(six_task_average(model) - six_task_average(base), abs=1e-9)
    var = 0.0
    for t, (metric, w) in SIX_TASK_WEIGHTS.items():
        key = "hits" if metric == "acc" else "hits_norm"
        d = np.array([int(c) for c in model[t][key]], np.float64) - np.array([int(c) for c in base[t][key]])
        var += (w * 100) ** 2 * d.var(ddof=1) / len(d)
    assert se == pytest.approx(var ** 0.5, rel=1e-9)
    # the models agree on most items, so the paired error is well under the unpaired one
    unpaired = sum((w * 100) ** 2 * (lambda q: q * (1 - q))(model[t][m] / 100) / SIZES[t]
                   for t, (m, w) in SIX_TASK_WEIGHTS.items()) ** 0.5 * 2 ** 0.5
    assert 0 < se < 0.7 * unpaired
    assert paired_difference(base, base) == (0.0, 0.0)


def test_paired_difference_refuses_other_items_or_no_hits():
    from mha2mla.evaluation import paired_difference

    rng = np.random.default_rng(8)
    base = random_scores(rng, SIZES, 0.4)
    other = random_scores(rng, dict(SIZES, piqa=182), 0.4)
    with pytest.raises(ValueError, match="piqa: 182 items against 183"):
        paired_difference(other, base)
    old = {t: {k: v for k, v in s.items() if not k.startswith("hits")} for t, s in base.items()}
    with pytest.raises(ValueError, match="no per-item hits"):
        paired_difference(old, base)


def test_evaluate_cli_reads_models_on_both_sides_of_an_option():
    from mha2mla.evaluate_cli import build_parser

    a = build_parser().parse_intermixed_args(["original", "--source", "/m/src", "/ft/run/last", "--batch-size", "8", "/ck"])
    assert a.models == ["original", "/ft/run/last", "/ck"] and a.source == "/m/src" and a.batch_size == 8
