"""Fine-tuning: a killed and resumed run continues the same loss curve; the
multi-process (DDP, gloo) path runs; the schedule has the paper's shape."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from mha2mla import ConversionOptions, convert_model, save_mla_model  # noqa: E402
from mha2mla.attention_transfer import TeacherAttentionTaps, attention_transfer_loss  # noqa: E402
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
    # attention transfer runs outside DDP's forward: its gradients are averaged by hand
    tiny_model("gqa").save_pretrained(d / "teacher_ddp")
    r = subprocess.run(cmd + ["--objective", "attention", "--teacher", str(d / "teacher_ddp"), "--output", str(d / "ddp_at")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    recs = records(d / "ddp_at")
    assert len(recs) == 6 and recs[-1]["loss"] < recs[0]["loss"]
    # the report says how the run was started and that its tokens/s is a sum over processes
    from mha2mla.finetune_report import main as report

    json.dump(dict(card="cpu", dtype="torch.float32", limit=0, models=[]), open(d / "ev_ddp.json", "w"))
    assert report([str(out), "--eval", str(d / "ev_ddp.json"), "--out", str(d / "report_ddp")]) == 0
    (run,) = json.load(open(d / "report_ddp" / "finetune_cpu.json"))["runs"]
    assert run["world_size"] == 2 and run["command"].startswith("torchrun --standalone --nproc-per-node 2 ")
    assert " (2 processes) |" in open(d / "report_ddp" / "finetune_cpu.md").read()


def torchrun(*argv, timeout=600):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "python", "finetune.py"), *map(str, argv)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def test_fsdp_matches_ddp_and_resumes(setup, tmp_path):
    """Sharded (FSDP2, gloo, two processes) training follows the replicated
    (DDP) run's loss curve, a killed and resumed sharded run continues it,
    and its checkpoint is a whole model that loads anywhere."""
    from mha2mla import load_mla_model

    d = setup
    tiny_model("gqa").save_pretrained(tmp_path / "teacher")
    kd = ["--distill-weight", "0.5", "--teacher", tmp_path / "teacher"]
    for name, extra in (("ddp", []), ("fsdp", ["--fsdp"]), ("fsdp_killed", ["--fsdp", "--stop-after", "3"])):
        r = torchrun(*args(d, tmp_path / name, *kd, *extra))
        assert r.returncode == 0, r.stderr[-3000:]
    assert len(losses(tmp_path / "fsdp_killed")) == 3
    r = torchrun(*args(d, tmp_path / "fsdp_killed", *kd, "--fsdp", "--resume"))
    assert r.returncode == 0, r.stderr[-3000:]
    ddp, fsdp, resumed = (losses(tmp_path / n) for n in ("ddp", "fsdp", "fsdp_killed"))
    assert len(fsdp) == 6 and fsdp[-1] < fsdp[0]
    assert fsdp == pytest.approx(ddp, rel=1e-4)
    assert resumed == pytest.approx(fsdp, rel=1e-6, abs=1e-7)
    whole = dict(load_mla_model(str(tmp_path / "fsdp" / "last")).named_parameters())
    for name, p in load_mla_model(str(tmp_path / "ddp" / "last")).named_parameters():
        torch.testing.assert_close(whole[name], p, rtol=1e-3, atol=1e-5)
    from mha2mla.finetune_report import main as report

    json.dump(dict(card="cpu", dtype="torch.float32", limit=0, models=[]), open(tmp_path / "ev.json", "w"))
    assert report([str(tmp_path / "fsdp"), "--eval", str(tmp_path / "ev.json"), "--out", str(tmp_path / "rep")]) == 0
    (run,) = json.load(open(tmp_path / "rep" / "finetune_cpu.json"))["runs"]
    assert run["command"].startswith("torchrun --standalone --nproc-per-node 2 ") and " --fsdp " in run["command"]
    # a sharded run's state resumes sharded only: refused in one line, nothing written
    before = open(tmp_path / "fsdp" / "log.jsonl").read()
    r = torchrun(*args(d, tmp_path / "fsdp", *kd, "--resume", "--max-steps", "8"))
    assert r.returncode != 0 and "was saved with --fsdp" in r.stderr
    assert open(tmp_path / "fsdp" / "log.jsonl").read() == before


def test_fsdp_attention_transfer_and_refusal_without_torchrun(setup, tmp_path, capsys):
    d = setup
    tiny_model("gqa").save_pretrained(tmp_path / "teacher")
    r = torchrun(*args(d, tmp_path / "at", "--objective", "attention", "--teacher", tmp_path / "teacher", "--fsdp"))
    assert r.returncode == 0, r.stderr[-3000:]
    recs = records(tmp_path / "at")
    assert len(recs) == 6 and recs[-1]["loss"] < recs[0]["loss"] and len(recs[-1]["layer_errors"]) == 2
    assert main(args(d, tmp_path / "single", "--fsdp")) == 2
    assert "torchrun" in capsys.readouterr().err and not os.path.exists(tmp_path / "single")


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


def test_two_processes_tokenizing_the_same_files_at_once(setup, tmp_path, monkeypatch):
    """Every process of a torchrun job tokenizes --eval-text into one cache:
    another process may finish between this one's write and its rename (it
    did on two H200s). Each process writes its own temporary file, so both
    end with the same cache file."""
    import mha2mla.training as training

    real_replace, real_getpid = os.replace, os.getpid
    cache, data = str(tmp_path / "cache"), [str(setup / "tokens.npy")]
    state = {"other_done": False}

    def other_process_finishes_first(src, dst):
        if not state["other_done"]:
            state["other_done"] = True
            monkeypatch.setattr(os, "getpid", lambda: real_getpid() + 1)
            try:
                training.tokenize_corpus(data, None, cache, False)  # the other process, start to end
            finally:
                monkeypatch.setattr(os, "getpid", real_getpid)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", other_process_finishes_first)
    tokens = training.tokenize_corpus(data, None, cache, False)
    assert state["other_done"]
    assert np.array_equal(np.asarray(tokens), np.load(setup / "tokens.npy").astype(np.uint32))
    assert [f for f in os.listdir(cache) if not f.endswith(".u32")] == []  # no temporary file left


def test_attention_transfer_loss_is_zero_only_for_an_exact_conversion():
    import copy

    teacher = tiny_model("gqa")
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(3))
    taps = TeacherAttentionTaps(teacher)
    exact = copy.deepcopy(teacher)
    convert_model(exact, stats_for(exact), ConversionOptions(r=8, d_kv=0), progress=False)  # all frequencies, full rank
    loss, errors = attention_transfer_loss(exact, teacher, taps, ids)
    assert len(taps.inputs) == len(taps.outputs) == 2 and errors.shape == (2,)
    assert float(loss.detach()) < 1e-10
    lossy = copy.deepcopy(teacher)
    convert_model(lossy, stats_for(lossy), ConversionOptions(r=2, d_kv=6), progress=False)
    loss, errors = attention_transfer_loss(lossy, teacher, taps, ids)
    assert float(errors.min()) > 1e-3
    loss.backward()  # the gradient reaches the converted attention, nothing else
    assert lossy.model.layers[0].self_attn.kv_down.weight.grad.abs().sum() > 0
    assert lossy.model.layers[0].mlp.up_proj.weight.grad is None
    taps.remove()


def test_attention_transfer_trains_attention_only_and_logs_eval_text(setup, tmp_path):
    from mha2mla import load_mla_model

    d = setup
    tiny_model("gqa").save_pretrained(tmp_path / "teacher")
    np.save(tmp_path / "eval.npy", (np.arange(800) * 7 % 97).astype(np.int32))
    out = tmp_path / "at"
    assert main(args(d, out, "--objective", "attention", "--teacher", str(tmp_path / "teacher"),
                     "--eval-text", str(tmp_path / "eval.npy"), "--lr", "1e-3")) == 0
    recs = records(out)
    assert len(recs) == 6 and "ce" not in recs[0]
    assert len(recs[2]["layer_errors"]) == 2 and "layer_errors" not in recs[0]
    first = json.loads(open(out / "log.jsonl").readline())
    assert first["eval_text_ppl"] > 1 and recs[-1]["eval_text_ppl"] > 1
    before, after = load_mla_model(str(d / "ckpt")), load_mla_model(str(out / "last"))
    # it learns: the per-step losses are too noisy at 2 x 16 tokens, so compare on one fixed, larger batch
    teacher = tiny_model("gqa")
    taps = TeacherAttentionTaps(teacher)
    ids = torch.from_numpy(np.load(d / "tokens.npy")[: 32 * 16].reshape(32, 16).astype(np.int64))
    with torch.no_grad():
        assert attention_transfer_loss(after, teacher, taps, ids)[0] < 0.8 * attention_transfer_loss(before, teacher, taps, ids)[0]
    changed = {n for (n, a), (_, b) in zip(before.named_parameters(), after.named_parameters()) if not torch.equal(a, b)}
    assert changed and all("self_attn" in n for n in changed)
    assert any("kv_down" in n for n in changed) and any("q_proj" in n for n in changed)


def test_attention_transfer_without_teacher_is_refused(setup, tmp_path, capsys):
    assert main(args(setup, tmp_path / "x", "--objective", "attention")) == 2
    assert "--teacher" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # refused before anything was written


@pytest.mark.gpu
def test_two_stage_recipe_on_gpu(setup, tmp_path):
    """Attention transfer then KL from its checkpoint, on the GPU path (bf16
    teacher, autocast, pinned copies, deferred log reads)."""
    d = setup
    tiny_model("gqa").save_pretrained(tmp_path / "teacher")
    teacher = ["--teacher", str(tmp_path / "teacher"), "--device", "cuda"]
    assert main(args(d, tmp_path / "at", "--objective", "attention", "--lr", "1e-3", *teacher)) == 0
    at = records(tmp_path / "at")
    assert len(at) == 6 and all(np.isfinite(r["loss"]) for r in at) and len(at[-1]["layer_errors"]) == 2
    kd = [str(tmp_path / "at" / "last"), *args(d, tmp_path / "kd", "--distill-weight", "0.5", *teacher)[1:]]
    assert main(kd) == 0
    recs = records(tmp_path / "kd")
    assert len(recs) == 6 and all(np.isfinite(r["loss"]) and r["loss"] != r["ce"] for r in recs)
    assert recs[-1]["tokens_per_s"] > 0 and "heldout_loss" in recs[-1]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_fsdp_on_two_gpus_nccl(setup, tmp_path):
    """The sharded path on GPUs (NCCL, bf16 autocast, bf16 teacher): it
    trains, and its checkpoint is the whole model."""
    from mha2mla import load_mla_model

    d = setup
    tiny_model("gqa").save_pretrained(tmp_path / "teacher")
    gpu = ["--device", "auto", "--distill-weight", "0.5", "--teacher", tmp_path / "teacher", "--fsdp"]
    r = torchrun(*args(d, tmp_path / "fsdp"), *gpu)  # the later --device wins
    assert r.returncode == 0, r.stderr[-3000:]
    recs = records(tmp_path / "fsdp")
    assert len(recs) == 6 and all(np.isfinite(x["loss"]) for x in recs) and recs[-1]["loss"] < recs[0]["loss"]
    load_mla_model(str(tmp_path / "fsdp" / "last"))


def test_report_chains_a_second_stage_after_the_first(setup, tmp_path):
    from mha2mla.finetune_report import main as report

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


def test_average_checkpoints_is_the_weighted_mean_and_refuses_other_conversions(setup, tmp_path, capsys):
    from mha2mla import load_mla_model
    from mha2mla.average_checkpoints import main as average

    d = setup
    assert main(args(d, tmp_path / "run")) == 0  # B: the converted checkpoint A after 6 steps
    a, b = str(d / "ckpt"), str(tmp_path / "run" / "last")
    assert average([a, b, "--weights", "1", "3", "--output", str(tmp_path / "avg")]) == 0
    pa, pb = (dict(load_mla_model(p).named_parameters()) for p in (a, b))
    avg = dict(load_mla_model(str(tmp_path / "avg")).named_parameters())
    assert any(not torch.equal(pa[k], pb[k]) for k in pa)  # the two differ, so the mean says something
    for k, v in avg.items():
        want = (0.25 * pa[k].double() + 0.75 * pb[k].double()).float()
        torch.testing.assert_close(v, want, rtol=1e-6, atol=1e-7)
    other = tiny_model("gqa")
    convert_model(other, stats_for(other), ConversionOptions(r=2, d_kv=4), progress=False)
    save_mla_model(other, str(tmp_path / "dkv4"))
    assert average([a, str(tmp_path / "dkv4"), "--output", str(tmp_path / "bad")]) == 2
    assert "another conversion" in capsys.readouterr().err and not (tmp_path / "bad").exists()
