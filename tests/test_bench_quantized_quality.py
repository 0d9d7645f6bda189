"""bench/quantized_quality.py: its table from evaluate.py and quantized_cache.py
results, and its argument checks (the measurements themselves are those
tools', tested with them)."""
import json
import os
import sys

import numpy as np
import pytest

pytest.importorskip("transformers")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from quantized_quality import main  # noqa: E402
from test_evaluation import SIZES, random_scores  # noqa: E402

from mha2mla.evaluation import paired_difference, six_task_average  # noqa: E402


def write(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def evaluation(rows, limit=600):
    return dict(card="Card X", dtype="torch.bfloat16", limit=limit, models=rows)


@pytest.fixture
def work(tmp_path):
    """Results as the two tools write them: two checkpoints through a 16-bit
    and an int4 cache, the original, and one long context."""
    rng = np.random.default_rng(3)
    scores = {}
    for ckpt, ppl in (("dkv32", 21.0), ("dkv16", 30.0)):
        base = random_scores(rng, SIZES, 0.40)
        base["wikitext"] = dict(ppl=ppl)
        quant = random_scores(rng, SIZES, 0.39, baseline=base, agree=0.9)
        quant["wikitext"] = dict(ppl=ppl * 1.03)
        scores[ckpt] = dict(auto=base, int4=quant)
    w = tmp_path / "work"
    for fmt, nbytes in (("auto", {"dkv32": 7200, "dkv16": 4320}), ("int4", {"dkv32": 3360, "dkv16": 2400})):
        rows = [dict(model=f"/x/{c}/last [{fmt} cache]", scores=scores[c][fmt], kv_bytes_per_token=nbytes[c])
                for c in ("dkv32", "dkv16")]
        write(str(w / f"ev_{fmt}" / "evaluation_Card_X.json"), evaluation(rows))
    original = random_scores(rng, SIZES, 0.42)
    original["wikitext"] = dict(ppl=19.0)
    write(str(w / "ev_original" / "evaluation_Card_X.json"),
          evaluation([dict(model="/x/orig", scores=original, kv_bytes_per_token=23040)]))
    write(str(w / "original4096" / "evaluation_Card_X.json"),
          evaluation([dict(model="/x/orig", scores=dict(wikitext=dict(ppl=19.3)))], limit=8))
    long_rows = [dict(checkpoint=f"{c}/last", rotation=rot, cache=fmt, ppl=p, ppl_ratio=p / ref)
                 for c in ("dkv32", "dkv16") for rot, ref in (("none", 52.0), ("hadamard", 52.1))
                 for fmt, p in (("auto", ref), ("int4", ref * 1.02))]
    write(str(w / "long4096" / "quantized_cache_Card_X.json"),
          dict(card="Card X", context=4096, windows=8, tokens=32760, ppl_data=os.path.abspath("wiki.test.raw"),
               rows=long_rows))
    return w, scores


def test_table_pairs_each_format_with_its_checkpoints_16bit_cache(work, tmp_path):
    w, scores = work
    assert main(["--tabulate", "--work", str(w), "--out", str(tmp_path / "out")]) == 0
    res = json.load(open(tmp_path / "out" / "quantized_quality_Card_X.json"))
    rows = {(r["checkpoint"], r["cache"]): r for r in res["rows"]}
    assert set(rows) == {("dkv32/last", "auto"), ("dkv32/last", "int4"), ("dkv16/last", "auto"), ("dkv16/last", "int4")}
    for c in ("dkv32", "dkv16"):
        r = rows[(f"{c}/last", "int4")]
        diff, se = paired_difference(scores[c]["int4"], scores[c]["auto"])
        assert r["diff"] == pytest.approx(diff) and r["se"] == pytest.approx(se) and se > 0
        assert r["avg"] == pytest.approx(six_task_average(scores[c]["int4"]))
        assert r["ppl_ratio"] == pytest.approx(1.03)
        assert rows[(f"{c}/last", "auto")]["diff"] is None
    assert res["original"]["ppl"] == 19.0 and res["original"]["long"] == {"4096": 19.3}
    assert len(res["long"]) == 8 and {r["checkpoint"] for r in res["long"]} == {"dkv32/last", "dkv16/last"}
    md = open(tmp_path / "out" / "quantized_quality_Card_X.md").read()
    r = rows[("dkv32/last", "int4")]
    assert (f"| dkv32/last | int4 | 3,360 (14.6%) | 21.63 | +3.00% | {r['avg']:.2f} | {r['diff']:+.2f} ({r['se']:.2f}) |"
            in md)
    assert "| dkv32/last | 16-bit | 7,200 (31.2%) | 21.00 |  |" in md and "| bytes/token (of the original) |" in md
    assert "| original | - | its K/V | 19.30 | |" in md
    assert "| dkv32/last | hadamard | int4 | 53.14 | +2.00% |" in md and "| dkv16/last | none | int4 | 53.04 | +2.00% |" in md
    assert "600 items per task" in md and "the first 8 non-overlapping windows" in md


def test_a_format_cut_short_keeps_its_perplexity(work, tmp_path):
    w, _ = work
    res = json.load(open(w / "ev_int4" / "evaluation_Card_X.json"))
    for m in res["models"]:
        del m["scores"]["mmlu"]  # the run stopped before the last task
    write(str(w / "ev_int4" / "evaluation_Card_X.json"), res)
    assert main(["--tabulate", "--work", str(w), "--out", str(tmp_path / "out")]) == 0
    md = open(tmp_path / "out" / "quantized_quality_Card_X.md").read()
    assert "| dkv16/last | int4 | 2,400 (10.4%) | 30.90 | +3.00% | - |  |" in md


def test_arguments_are_checked_before_anything_runs(tmp_path, capsys):
    assert main([]) == 2
    assert "give converted checkpoint folders" in capsys.readouterr().err
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "config.json").write_text("{}")
    assert main([str(tmp_path / "ck"), "--formats", "int3"]) == 2
    assert "--formats int3" in capsys.readouterr().err
    assert main([str(tmp_path / "ck"), "--long-contexts", "4k"]) == 2
    assert "numbers of tokens" in capsys.readouterr().err
    assert main([str(tmp_path / "nothing")]) == 2
    assert "not a converted checkpoint" in capsys.readouterr().err
    assert main(["--tabulate", "--work", str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    assert "no results under" in capsys.readouterr().err
    write(str(tmp_path / "orig_only" / "ev_original" / "evaluation_cpu.json"), evaluation([]))
    assert main(["--tabulate", "--work", str(tmp_path / "orig_only"), "--out", str(tmp_path / "out")]) == 2
    assert "no results under" in capsys.readouterr().err
    assert main(["--tabulate", str(tmp_path / "ck"), "--out", str(tmp_path / "out")]) == 2
    assert "leave out CHECKPOINT" in capsys.readouterr().err
    assert main([str(tmp_path / "ck"), "--rotations", "none,spin"]) == 2
    assert "--rotations spin" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_second_run_skips_the_long_contexts_already_measured(work, tmp_path):
    from quantized_quality import build_parser, plan

    w, _ = work
    ck, other = str(tmp_path / "dkv32" / "last"), str(tmp_path / "other" / "last")

    def planned(*argv):
        args = build_parser().parse_args([*argv, "--work", str(w), "--formats", "int4", "--long-contexts", "4096,8192"])
        return {what: a for what, _, a in plan(args, ["auto", "int4"], [4096, 8192])}

    # long4096 holds dkv32/last's rows over 8 windows of the same text: only 8192's study runs
    steps = planned(ck, "--ppl-data", "wiki.test.raw", "--original", "SRC")
    assert set(steps) == {"auto cache", "int4 cache", "original", "8192-token windows", "original, 4096-token windows",
                          "original, 8192-token windows"}
    assert steps["int4 cache"][steps["int4 cache"].index("--cache-dtype") + 1] == "int4"
    assert "--resume" in steps["auto cache"] and steps["auto cache"][-1] == str(w / "ev_auto")
    study = steps["8192-token windows"]
    assert study[study.index("--formats") + 1] == "auto,int4" and study[study.index("--context") + 1] == "8192"
    ref = steps["original, 8192-token windows"]
    assert ref[ref.index("--ppl-stride") + 1] == "8192" and ref[ref.index("--limit") + 1] == "8"
    # another checkpoint, other windows or another text: the 4096-token study runs again
    for argv in ([other, "--ppl-data", "wiki.test.raw"], [ck, "--ppl-data", "wiki.test.raw", "--long-windows", "4"],
                 [ck, "--ppl-data", "other.txt"]):
        assert "4096-token windows" in planned(*argv), argv


def test_runs_as_a_script():
    import subprocess

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "quantized_quality.py")
    r = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "usage: python bench/quantized_quality.py" in r.stdout, r.stderr[-2000:]


def test_a_work_folder_of_two_cards_is_refused(work, tmp_path, capsys):
    w, _ = work
    res = json.load(open(w / "ev_int4" / "evaluation_Card_X.json"))
    write(str(w / "ev_int4" / "evaluation_Card_Y.json"), dict(res, card="Card Y"))
    assert main(["--tabulate", "--work", str(w), "--out", str(tmp_path / "out")]) == 2
    assert "holds results of 2 cards" in capsys.readouterr().err
    os.remove(w / "ev_int4" / "evaluation_Card_X.json")  # one card a folder, but two in the work folder
    assert main(["--tabulate", "--work", str(w), "--out", str(tmp_path / "out")]) == 2
    assert "card 'Card Y'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_16_bit_cache_is_measured_first_and_names_stay_distinct(tmp_path, capsys):
    from quantized_quality import build_parser, plan

    for name in ("a/last", "b/last"):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "config.json").write_text("{}")
    cks = [str(tmp_path / "a" / "last"), str(tmp_path / "b" / "last")]
    args = build_parser().parse_args([*cks, "--work", str(tmp_path / "w"), "--formats", "fp8,auto,fp8"])
    steps = [(what, argv) for what, _, argv in plan(args, ["auto", "fp8"], [4096])]
    assert [w for w, _ in steps] == ["auto cache", "fp8 cache", "4096-token windows"]
    assert steps[2][1][steps[2][1].index("--formats") + 1] == "auto,fp8"
    (tmp_path / "c" / "a").mkdir(parents=True)
    (tmp_path / "c" / "a" / "config.json").write_text("{}")
    (tmp_path / "d" / "a").mkdir(parents=True)
    (tmp_path / "d" / "a" / "config.json").write_text("{}")
    assert main([str(tmp_path / "c" / "a"), str(tmp_path / "d" / "a"), "--work", str(tmp_path / "w")]) == 2
    assert "both named a" in capsys.readouterr().err
