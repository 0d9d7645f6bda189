"""The studies in bench/studies, run on real outputs of finetune.py and
evaluate.py-shaped JSON: the fine-tuning report pairs runs with their
evaluations and chains stages; the comparison with a baseline gives paired
errors. Both run as scripts."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("transformers")

STUDIES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "studies")
sys.path.insert(0, STUDIES)

import compare_evaluations  # noqa: E402
from finetune_report import main as report  # noqa: E402
from mha2mla.finetune_cli import main  # noqa: E402
from test_conversion import tiny_model  # noqa: E402
from test_evaluation import SIZES, random_scores  # noqa: E402
from test_finetune import args, setup  # noqa: E402,F401  (setup: the tiny converted checkpoint and its data)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """The token cache of each test in its own folder, never the user's."""
    monkeypatch.setenv("MHA2MLA_CACHE", str(tmp_path / "cache"))


def test_report_pairs_runs_with_their_evaluations(setup, tmp_path):
    d = setup
    run_dir = tmp_path / "run"
    assert main(args(d, run_dir)) == 0
    ev = dict(card="cpu", dtype="torch.float32", limit=0, models=[
        dict(model=str(d / "ckpt"), kv_bytes_per_token=123, scores=dict(wikitext=dict(ppl=50.0))),
        dict(model=str(run_dir / "last"), kv_bytes_per_token=123, scores=dict(wikitext=dict(ppl=20.0)))])
    json.dump(ev, open(tmp_path / "ev.json", "w"))
    assert report([str(run_dir), "--eval", str(tmp_path / "ev.json"), "--out", str(tmp_path)]) == 0
    res = json.load(open(tmp_path / "finetune_cpu.json"))
    (run,) = res["runs"]
    held = [r["heldout_loss"] for r in map(json.loads, open(run_dir / "log.jsonl")) if "heldout_loss" in r]
    assert (run["ppl_before"], run["ppl_after"], run["kv_bytes_per_token"]) == (50.0, 20.0, 123)
    assert (run["heldout_before"], run["heldout_after"], run["tokens"]) == (held[0], held[-1], 6 * 2 * 16)
    assert "50.00 → 20.00" in open(tmp_path / "finetune_cpu.md").read()
    # a JSON that is no evaluation (compare_evaluations' output, say): refused, nothing written
    json.dump(dict(baseline={}, models=[dict(model="x", avg=40.0)]), open(tmp_path / "cmp.json", "w"))
    assert report([str(run_dir), "--eval", str(tmp_path / "cmp.json"), "--out", str(tmp_path / "no")]) == 2
    assert not (tmp_path / "no").exists()

    # the original's in-loop figures taken from an earlier report's run measured the same way (another name and
    # seed: the seed orders training data only), not measured again
    earlier = dict(runs=[dict(res["runs"][0], name="other", original=dict(heldout_loss=1.234, eval_text_ppl=5.678))])
    earlier["runs"][0]["config"]["seed"] = 7
    json.dump(earlier, open(tmp_path / "earlier.json", "w"))
    again = tmp_path / "again"
    assert report([str(run_dir), "--eval", str(tmp_path / "ev.json"), "--original-from", str(tmp_path / "earlier.json"),
                   "--out", str(again)]) == 0
    assert json.load(open(again / "finetune_cpu.json"))["runs"][0]["original"] == earlier["runs"][0]["original"]
    assert "(original 1.234)" in open(again / "finetune_cpu.md").read()
    # measured on other sequences (length, batch size or eval text): not taken
    for key, value in (("seq_len", 32), ("batch_size", 1), ("eval_text", "other.txt")):
        changed = json.loads(json.dumps(earlier))
        run = changed["runs"][0]
        (run if key == "eval_text" else run["config"])[key] = value
        json.dump(changed, open(tmp_path / "earlier.json", "w"))
        out = tmp_path / f"not_{key}"
        assert report([str(run_dir), "--eval", str(tmp_path / "ev.json"), "--original-from",
                       str(tmp_path / "earlier.json"), "--out", str(out)]) == 0
        assert json.load(open(out / "finetune_cpu.json"))["runs"][0]["original"] == {}
        assert "(original" not in open(out / "finetune_cpu.md").read()


def test_report_chains_a_second_stage_after_the_first(setup, tmp_path):
    d = setup
    tiny_model("gqa").save_pretrained(tmp_path / "teacher")
    short = ["--max-steps", "2", "--teacher", str(tmp_path / "teacher")]
    assert main(args(d, tmp_path / "at", "--objective", "attention", "--lr", "1e-3", *short)) == 0
    assert main([str(tmp_path / "at" / "last"), *args(d, tmp_path / "kd", "--distill-weight", "1.0",
                                                      "--new-proj-lr-mult", "4", *short)[1:]]) == 0
    ev = dict(card="cpu", dtype="torch.float32", limit=0, models=[
        dict(model=str(tmp_path / "kd" / "last"), kv_bytes_per_token=1, scores=dict(wikitext=dict(ppl=9.0)))])
    json.dump(ev, open(tmp_path / "ev.json", "w"))
    assert report([str(tmp_path / "at"), str(tmp_path / "kd"), "--eval", str(tmp_path / "ev.json"), "--out", str(tmp_path)]) == 0
    at, kd = json.load(open(tmp_path / "finetune_cpu.json"))["runs"]
    assert (at["objective"], at["earlier_tokens"], at["after"]) == ("attention", 0, None)
    assert (kd["objective"], kd["earlier_tokens"], kd["after"]) == ("lm", 2 * 2 * 16, "at")
    md = open(tmp_path / "finetune_cpu.md").read()
    assert "attention transfer, lr 0.001 |" in md and "KL to original, lr 0.003 (new projections x4) |" in md
    assert "9.00" in md and "python python/finetune.py" in md

def test_report_says_how_a_multi_process_run_was_started(setup, tmp_path):
    """A torchrun run's run.json (world_size, fsdp; test_finetune checks the
    loop writes them): the command is torchrun's, the tokens/s a sum."""
    d = setup
    run_dir = tmp_path / "fsdp"
    assert main(args(d, run_dir, "--max-steps", "2")) == 0
    run = json.load(open(run_dir / "run.json"))
    json.dump(dict(run, world_size=2, fsdp=True), open(run_dir / "run.json", "w"))
    json.dump(dict(card="cpu", dtype="torch.float32", limit=0, models=[]), open(tmp_path / "ev.json", "w"))
    assert report([str(run_dir), "--eval", str(tmp_path / "ev.json"), "--out", str(tmp_path / "rep")]) == 0
    (row,) = json.load(open(tmp_path / "rep" / "finetune_cpu.json"))["runs"]
    assert row["world_size"] == 2 and row["command"].startswith("torchrun --standalone --nproc-per-node 2 ")
    assert " --fsdp " in row["command"] and " (2 processes) |" in open(tmp_path / "rep" / "finetune_cpu.md").read()


def test_compare_evaluations_cli(tmp_path, capsys):
    rng = np.random.default_rng(9)
    base = random_scores(rng, SIZES, 0.42)
    base["wikitext"] = dict(ppl=19.0)
    model = random_scores(rng, SIZES, 0.40, baseline=base)
    model["wikitext"] = dict(ppl=20.52)
    for name, rows in (("a.json", [dict(model="/m/original", scores=base)]), ("b.json", [dict(model="/tmp/ft/mix/last", scores=model)])):
        (tmp_path / name).write_text(json.dumps(dict(card="Card X", models=rows)))
    files = [str(tmp_path / "a.json"), str(tmp_path / "b.json")]
    assert compare_evaluations.main(files + ["--baseline", "original", "--target", "1.1", "-1", "--out", str(tmp_path / "o")]) == 0
    from mha2mla.results import pyplot

    assert (tmp_path / "o" / "comparison_Card_X.png").exists() == (pyplot() is not None)
    out = json.loads((tmp_path / "o" / "comparison_Card_X.json").read_text())
    (row,) = out["models"]
    assert row["ppl_ratio"] == pytest.approx(20.52 / 19.0) and row["se"] > 0
    md = (tmp_path / "o" / "comparison_Card_X.md").read_text()
    assert "| mix/last | 20.52 | 1.080 |" in md and f"{row['diff']:+.2f}" in md
    assert compare_evaluations.main(files + ["--baseline", "nothing"]) == 2
    assert "matches 0 models" in capsys.readouterr().err
    # evaluations of the tasks alone (no WikiText-2): the perplexity columns say so
    for name in ("a.json", "b.json"):
        res = json.loads((tmp_path / name).read_text())
        del res["models"][0]["scores"]["wikitext"]
        (tmp_path / name).write_text(json.dumps(res))
    assert compare_evaluations.main(files + ["--baseline", "original", "--target", "1.1", "-1"]) == 0
    out = capsys.readouterr().out
    assert "WikiText-2 not measured" in out and "| mix/last | - | - |" in out

def test_compare_evaluations_draws_no_target_unless_given(tmp_path):
    rng = np.random.default_rng(10)
    base = random_scores(rng, SIZES, 0.42)
    model = random_scores(rng, SIZES, 0.40, baseline=base)
    path = tmp_path / "e.json"
    path.write_text(json.dumps(dict(card="C", models=[dict(model="original", scores=base), dict(model="m", scores=model)])))
    assert compare_evaluations.build_parser().parse_args([str(path), "--baseline", "original"]).target is None
    assert compare_evaluations.main([str(path), "--baseline", "original", "--out", str(tmp_path / "o")]) == 0
    assert json.loads((tmp_path / "o" / "comparison_C.json").read_text())["models"][0]["model"] == "m"


@pytest.mark.parametrize("script", ["finetune_report.py", "compare_evaluations.py", "quantized_cache.py",
                                    "latent_quant_error.py"])
def test_studies_run_as_scripts(script):
    r = subprocess.run([sys.executable, os.path.join(STUDIES, script), "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"usage: python bench/studies/{script}" in r.stdout


def test_decode_configs_checks_its_arguments_before_looking_for_a_gpu():
    script = os.path.join(STUDIES, "decode_configs.py")
    r = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--splits" in r.stdout, r.stderr[-2000:]
    r = subprocess.run([sys.executable, script, "--splits", "2", "129"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--splits takes split counts from 1 to 128" in r.stderr, r.stderr[-2000:]


def test_latent_quant_error_reads_back_what_the_append_wrote():
    """The study's reader of cache rows against latents the formats hold
    exactly: int4 codes -7..7 times each group's scale (amax 7 per group),
    fp8 values of the e4m3 grid times a scale (amax 448); any slip in the
    nibble order, the sign or the scale's group shows."""
    from latent_quant_error import through_cache

    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    N, R = 37, 24
    for fmt, group, top, grid in (("int4", R, 7, torch.arange(-7, 8)), ("int4-g8", 8, 7, torch.arange(-7, 8)),
                                  ("fp8-g12", 12, 448, torch.tensor([-16., -3.5, -1, 0, 0.5, 2, 9, 14]))):
        vals = grid[torch.randint(0, len(grid), (N, R), generator=g)].float().view(N, -1, group)
        vals[:, :, 0] = top  # each group's amax, so its scale is exactly what it was built with
        scales = 2.0 ** torch.randint(-6, 4, (N, R // group, 1), generator=g).float()
        c = (vals * scales).view(N, R)
        assert torch.equal(through_cache(c, fmt, 8), c), fmt


def test_latent_quant_error_study(setup, tmp_path, capsys):
    from latent_quant_error import main as study

    d = setup  # a tiny converted checkpoint (latent 12 wide, 2 rope pairs) and token ids
    out = tmp_path / "out"
    rc = study([str(d / "ckpt"), "--tokens", str(d / "tokens.npy"), "--context", "16", "--windows", "3",
                "--formats", "int4,int4-g8,int4-g4,fp8", "--rotations", "none,hadamard", "--out", str(out)])
    assert rc == 0
    assert "skipping int4-g8" in capsys.readouterr().err  # 8 does not divide 12
    rows = json.loads((out / "latent_quant_error_cpu.json").read_text())["rows"]
    assert [(r["rotation"], r["cache"]) for r in rows] == [(rot, f) for rot in ("none", "hadamard")
                                                           for f in ("int4", "int4-g4", "fp8")]
    by = {(r["rotation"], r["cache"]): r for r in rows}
    assert by["none", "int4"]["k_ratio"] == by["none", "int4"]["v_ratio"] == 1.0
    for rot in ("none", "hadamard"):  # 8 bits err far less than 4, and the row sizes follow the layout
        assert by[rot, "fp8"]["k_rel_mse"] < by[rot, "int4"]["k_rel_mse"] / 4
        assert by[rot, "fp8"]["v_rel_mse"] < by[rot, "int4"]["v_rel_mse"] / 4
        assert 0 < by[rot, "int4"]["k_rel_mse"] < 0.1
    # rows of 16-byte multiples: codes | float32 scales | 8 bf16 rope keys (4 pairs): int4 6 + (2) + 4 + 16,
    # int4-g4 6 + (2) + 12 + 16, fp8 12 + 4 + 16
    assert [by["none", f]["row_bytes"] for f in ("int4", "int4-g4", "fp8")] == [32, 48, 32]
    assert "| int4-g4 |" in (out / "latent_quant_error_cpu.md").read_text()
    assert study([str(d / "ckpt"), "--formats", "int4,bf16"]) == 2  # refused before any work
    assert study([str(d / "ckpt"), "--rotations", "none,givens"]) == 2
