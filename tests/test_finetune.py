"""Fine-tuning: a killed and resumed run continues the same loss curve; the
multi-process (DDP, gloo) path runs; the schedule has the paper's shape."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("transformers")

from mha2mla import ConversionOptions, convert_model, save_mla_model  # noqa: E402
from mha2mla.finetune_cli import main  # noqa: E402
from mha2mla.training import TrainConfig, lr_at  # noqa: E402
from test_conversion import stats_for, tiny_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("ft")
    model = tiny_model("gqa")
    convert_model(model, stats_for(model), ConversionOptions(r=2, d_kv=6), progress=False)
    save_mla_model(model, str(d / "ckpt"))
    rng = np.random.default_rng(0)
    # a learnable stream: a repeating pattern with noise
    tokens = np.tile(np.arange(40), 200) + rng.integers(0, 2, 8000)
    np.save(d / "tokens.npy", tokens.astype(np.int32))
    return d


def args(d, out, *extra):
    return [str(d / "ckpt"), "--output", str(out), "--data", str(d / "tokens.npy"), "--max-steps", "6",
            "--batch-size", "2", "--seq-len", "16", "--save-every", "3", "--eval-every", "3", "--warmup-steps", "2",
            "--lr", "3e-3", "--device", "cpu", "--quiet", *extra]


def records(out):
    """Training records of log.jsonl (the step-0 held-out record aside)."""
    return [r for r in map(json.loads, open(os.path.join(out, "log.jsonl"))) if r["step"] > 0]


def losses(out):
    return [r["loss"] for r in records(out)]


def test_resume_continues_the_same_loss_curve(setup):
    d = setup
    assert main(args(d, d / "straight")) == 0
    assert main(args(d, d / "killed", "--stop-after", "3")) == 0
    assert len(losses(d / "killed")) == 3
    assert main(args(d, d / "killed", "--resume")) == 0
    straight, resumed = losses(d / "straight"), losses(d / "killed")
    assert len(resumed) == 6
    assert resumed == pytest.approx(straight, rel=1e-6, abs=1e-7)
    assert straight[-1] < straight[0]  # it learns
    assert os.path.exists(d / "straight" / "loss_curve.png")
    first = json.loads(open(d / "straight" / "log.jsonl").readline())
    assert first["step"] == 0 and first["heldout_loss"] > records(d / "straight")[-1]["heldout_loss"]


def test_time_limit_stops_with_a_resumable_checkpoint(setup):
    d = setup
    out = d / "timed"
    assert main(args(d, out, "--max-minutes", "1e-9")) == 0  # out of time after the first step
    recs = records(out)
    assert len(recs) == 1 and "stopped" in recs[0] and "heldout_loss" in recs[0]
    assert main(args(d, out, "--resume")) == 0
    assert [r["step"] for r in records(out)] == list(range(1, 7))
    assert losses(out) == pytest.approx(losses(d / "straight"), rel=1e-6, abs=1e-7)


def test_ddp_two_processes_gloo(setup):
    d = setup
    out = d / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "python", "finetune.py"), *args(d, out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    recs = records(out)
    assert len(recs) == 6 and all(np.isfinite(x["loss"]) for x in recs)
    # two processes: twice the sequences per step
    assert recs[0]["tokens"] == 2 * 2 * 16


def test_distillation_from_the_original(setup, tmp_path):
    d = setup
    teacher = tiny_model("gqa")  # the unconverted model the checkpoint came from
    teacher.save_pretrained(tmp_path / "teacher")
    out = tmp_path / "kd"
    assert main(args(d, out, "--distill-weight", "0.5", "--distill-temperature", "2.0", "--teacher",
                     str(tmp_path / "teacher"), "--max-steps", "2")) == 0
    recs = records(out)
    assert len(recs) == 2 and all(abs(r["loss"] - r["ce"]) > 1e-4 for r in recs)


def test_schedule_warmup_constant_sqrt_decay():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, max_steps=100, decay_frac=0.2)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(50, cfg) == 1.0
    assert lr_at(90, cfg) == pytest.approx(1 - (0.5 ** 0.5))
    assert lr_at(100, cfg) == pytest.approx(0.0, abs=1e-9)


def test_report_pairs_runs_with_their_evaluations(setup, tmp_path):
    from mha2mla.finetune_report import main as report

    d = setup  # runs after test_resume_..., whose "straight" run it reads
    ev = dict(card="cpu", dtype="torch.float32", limit=0, models=[
        dict(model=str(d / "ckpt"), kv_bytes_per_token=123, scores=dict(wikitext=dict(ppl=50.0))),
        dict(model=str(d / "straight" / "last"), kv_bytes_per_token=123, scores=dict(wikitext=dict(ppl=20.0)))])
    json.dump(ev, open(tmp_path / "ev.json", "w"))
    assert report([str(d / "straight"), "--eval", str(tmp_path / "ev.json"), "--out", str(tmp_path)]) == 0
    res = json.load(open(tmp_path / "finetune_cpu.json"))
    (run,) = res["runs"]
    held = [r["heldout_loss"] for r in map(json.loads, open(d / "straight" / "log.jsonl")) if "heldout_loss" in r]
    assert (run["ppl_before"], run["ppl_after"], run["kv_bytes_per_token"]) == (50.0, 20.0, 123)
    assert (run["heldout_before"], run["heldout_after"], run["tokens"]) == (held[0], held[-1], 6 * 2 * 16)
    assert "50.00 → 20.00" in open(tmp_path / "finetune_cpu.md").read()
