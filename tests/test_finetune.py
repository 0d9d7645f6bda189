"""Fine-tuning: a killed, stopped or interrupted (Ctrl-C) and resumed run
continues the same loss curve with each step logged once; outputs of earlier
runs are refused or replaced without losing other files; the token cache is
shared by runs; evaluations are capped; the multi-process (DDP, FSDP, gloo)
paths run; the schedule has the paper's shape."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

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


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """The token cache of each test in its own folder, never the user's."""
    monkeypatch.setenv("MHA2MLA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


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


def how_far(r, out) -> str:
    """A failed torchrun run's stderr, and how far it got: the records its
    log holds (a run that finished and then died at exit has them all)."""
    log = os.path.join(out, "log.jsonl")
    steps = [json.loads(line)["step"] for line in open(log)] if os.path.isfile(log) else None
    return f"{r.stderr[-3000:]}\nlogged steps: {steps}"


def test_ddp_two_processes_gloo(setup):
    d = setup
    out = d / "ddp"
    r = torchrun(*args(d, out))
    assert r.returncode == 0, how_far(r, out)
    recs = records(out)
    assert len(recs) == 6 and all(np.isfinite(x["loss"]) for x in recs)
    # two processes: twice the sequences per step
    assert recs[0]["tokens"] == 2 * 2 * 16
    # attention transfer runs outside DDP's forward: its gradients are averaged by hand
    tiny_model("gqa").save_pretrained(d / "teacher_ddp")
    r = torchrun(*args(d, out), "--objective", "attention", "--teacher", d / "teacher_ddp", "--output", d / "ddp_at")
    assert r.returncode == 0, how_far(r, d / "ddp_at")
    recs = records(d / "ddp_at")
    assert len(recs) == 6 and recs[-1]["loss"] < recs[0]["loss"]
    # what a report needs to say how the run was started (test_studies: the report from such a run.json)
    run = json.load(open(out / "run.json"))
    assert run["world_size"] == 2 and run["fsdp"] is False


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
        assert r.returncode == 0, how_far(r, tmp_path / name)
    assert len(losses(tmp_path / "fsdp_killed")) == 3
    r = torchrun(*args(d, tmp_path / "fsdp_killed", *kd, "--fsdp", "--resume"))
    assert r.returncode == 0, how_far(r, tmp_path / "fsdp_killed")
    ddp, fsdp, resumed = (losses(tmp_path / n) for n in ("ddp", "fsdp", "fsdp_killed"))
    assert len(fsdp) == 6 and fsdp[-1] < fsdp[0]
    assert fsdp == pytest.approx(ddp, rel=1e-4)
    assert resumed == pytest.approx(fsdp, rel=1e-6, abs=1e-7)
    whole = dict(load_mla_model(str(tmp_path / "fsdp" / "last")).named_parameters())
    for name, p in load_mla_model(str(tmp_path / "ddp" / "last")).named_parameters():
        torch.testing.assert_close(whole[name], p, rtol=1e-3, atol=1e-5)
    run = json.load(open(tmp_path / "fsdp" / "run.json"))
    assert run["world_size"] == 2 and run["fsdp"] is True
    # a sharded run's state resumes sharded only: refused in one line, nothing written
    before = open(tmp_path / "fsdp" / "log.jsonl").read()
    r = torchrun(*args(d, tmp_path / "fsdp", *kd, "--resume", "--max-steps", "8"))
    assert r.returncode != 0 and "was saved with --fsdp" in r.stderr
    assert open(tmp_path / "fsdp" / "log.jsonl").read() == before


def test_fsdp_attention_transfer_and_refusal_without_torchrun(setup, tmp_path, capsys):
    d = setup
    tiny_model("gqa").save_pretrained(tmp_path / "teacher")
    r = torchrun(*args(d, tmp_path / "at", "--objective", "attention", "--teacher", tmp_path / "teacher", "--fsdp"))
    assert r.returncode == 0, how_far(r, tmp_path / "at")
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


def test_two_processes_tokenizing_the_same_files_at_once(setup, tmp_path, monkeypatch):
    """Every process of a torchrun job tokenizes --eval-text into one cache:
    another process may finish between this one's write and its rename.
    Each process writes its own temporary file, so both end with the same
    cache file."""
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
    assert r.returncode == 0, how_far(r, tmp_path / "fsdp")
    recs = records(tmp_path / "fsdp")
    assert len(recs) == 6 and all(np.isfinite(x["loss"]) for x in recs) and recs[-1]["loss"] < recs[0]["loss"]
    load_mla_model(str(tmp_path / "fsdp" / "last"))


def test_average_checkpoints_is_the_weighted_mean_and_refuses_other_conversions(setup, tmp_path, capsys):
    from mha2mla import load_mla_model
    from mha2mla.average_checkpoints import main as average

    d = setup
    assert main(args(d, tmp_path / "run")) == 0  # B: the converted checkpoint A after 6 steps
    a, b = str(d / "ckpt"), str(tmp_path / "run" / "last")
    assert average([a, b, "--weights", "1", "3", "--output", str(tmp_path / "avg")]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"averaged checkpoint of 2 runs: {tmp_path / 'avg'}"
    assert average([a, a, "--output", str(tmp_path / "twice")]) == 0  # allowed, but said
    assert "is given more than once" in capsys.readouterr().err
    assert average([a, b, "--output", str(tmp_path / "avg")]) == 2  # not without --overwrite
    (err,) = capsys.readouterr().err.splitlines()
    assert "already holds a checkpoint: add --overwrite" in err and "overwrite=True" not in err
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


def char_tokenizer(letters="abcdefghijklmnopqrstuvwxyz .,\n"):
    """A real fast tokenizer, one token per character (unknown ones to the
    last id, also the end of sequence)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(letters)}
    vocab["[EOS]"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[EOS]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="[EOS]")


def test_eval_text_is_capped_and_shows_progress(setup, tmp_path, capsys):
    d = setup
    np.save(tmp_path / "eval.npy", (np.arange(800) * 7 % 97).astype(np.int32))  # 47 sequences of 16 + 1
    quick = ["--eval-text", str(tmp_path / "eval.npy"), "--max-steps", "2", "--eval-every", "2"]
    assert main(args(d, tmp_path / "capped", *quick, "--eval-text-tokens", "64")) == 0
    evals = [r for r in map(json.loads, open(tmp_path / "capped" / "log.jsonl")) if "eval_text_loss" in r]
    assert [r["step"] for r in evals] == [0, 2] and all(r["eval_text_tokens"] == 64 for r in evals)
    assert main(args(d, tmp_path / "all", *quick, "--eval-text-tokens", "all")) == 0
    evals = [r for r in map(json.loads, open(tmp_path / "all" / "log.jsonl")) if "eval_text_loss" in r]
    assert all(r["eval_text_tokens"] == 47 * 16 for r in evals)
    # the same text scored further: another loss than the capped one's
    capped = json.loads(open(tmp_path / "capped" / "log.jsonl").readline())
    assert json.loads(open(tmp_path / "all" / "log.jsonl").readline())["eval_text_loss"] != capped["eval_text_loss"]
    capsys.readouterr()
    # without --quiet, each evaluation pass has its bar
    assert main([a for a in args(d, tmp_path / "shown", *quick) if a != "--quiet"]) == 0
    shown = capsys.readouterr()
    assert "held-out loss" in shown.err and "eval text" in shown.err
    # a finished run ends with where its checkpoint is and its last figures
    (last,) = [line for line in shown.out.splitlines() if line.startswith("checkpoint: ")]
    assert str(tmp_path / "shown" / "last") in last and "(step 2)" in last and "--eval-text perplexity" in last


# Runs a script with SIGINT raising KeyboardInterrupt, as it does in a
# terminal. A process started in the background by a non-interactive shell
# (`pytest ... &` in a script) ignores SIGINT, and its children inherit that:
# without this, a Ctrl-C sent before the training loop sets its own handler
# would be lost.
TERMINAL_SIGINT = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                   "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def interrupted_finetune(argv, ready, timeout: float = 120):
    """Runs finetune.py in a subprocess, sends it SIGINT (Ctrl-C) once
    ready() holds, and returns (process, its stderr) after it exits."""
    proc = subprocess.Popen([sys.executable, "-c", TERMINAL_SIGINT, os.path.join(ROOT, "python", "finetune.py"), *argv],
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and proc.poll() is None and not ready():
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=timeout)[1]
    finally:
        proc.kill()
    return proc, err


def test_ctrl_c_saves_a_resumable_checkpoint(setup, tmp_path):
    """SIGINT to a running finetune.py: it stops after the step it is in,
    saves last/ with that step, says in one line how to go on and exits
    130; --resume then continues the very curve of a run never stopped."""
    from mha2mla.training import load_state

    d = setup
    endless = ["--max-steps", "100000", "--save-every", "100000", "--eval-every", "100000", "--log-every", "1"]
    out = tmp_path / "interrupted"
    proc, err = interrupted_finetune(
        args(d, out, *endless),
        ready=lambda: os.path.exists(out / "log.jsonl") and len(open(out / "log.jsonl").readlines()) >= 4)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "--resume" in err.strip().splitlines()[-1]
    steps = [r["step"] for r in map(json.loads, open(out / "log.jsonl"))]
    stopped_at = steps[-1]
    assert steps == list(range(stopped_at + 1)) and stopped_at >= 3
    assert int(load_state(str(out / "last"))["step"]) == stopped_at
    assert main(args(d, out, *endless, "--resume", "--stop-after", "2")) == 0
    assert [r["step"] for r in map(json.loads, open(out / "log.jsonl"))] == list(range(stopped_at + 3))
    assert main(args(d, tmp_path / "straight", *endless, "--stop-after", str(stopped_at + 2))) == 0
    assert losses(out) == pytest.approx(losses(tmp_path / "straight"), rel=1e-6, abs=1e-7)


def test_resume_after_a_kill_logs_each_step_once(setup, tmp_path):
    """A run killed after logging steps its last checkpoint does not hold
    (logged at step 5, saved at 3): the resumed run logs 4 and 5 again, once."""
    d = setup
    out = tmp_path / "killed"
    assert main(args(d, out, "--stop-after", "3")) == 0
    shutil.copytree(out / "last", tmp_path / "step3")
    assert main(args(d, out, "--resume", "--stop-after", "2")) == 0
    shutil.rmtree(out / "last")
    shutil.copytree(tmp_path / "step3", out / "last")  # the kill came before step 5's checkpoint replaced step 3's
    assert [r["step"] for r in records(out)] == [1, 2, 3, 4, 5]
    assert main(args(d, out, "--resume")) == 0
    assert [r["step"] for r in map(json.loads, open(out / "log.jsonl"))] == list(range(7))
    assert main(args(d, tmp_path / "straight")) == 0
    assert losses(out) == pytest.approx(losses(tmp_path / "straight"), rel=1e-6, abs=1e-7)


def test_an_earlier_run_is_refused_or_replaced_keeping_other_files(setup, tmp_path, capsys):
    d = setup
    out = tmp_path / "run"
    assert main(args(d, out, "--max-steps", "2")) == 0
    log = open(out / "log.jsonl").read()
    capsys.readouterr()
    assert main(args(d, out, "--max-steps", "2")) == 2
    err = capsys.readouterr().err
    assert "holds an earlier run" in err and "--resume" in err and "--overwrite" in err and len(err.splitlines()) == 1
    assert open(out / "log.jsonl").read() == log
    (out / "notes.txt").write_text("mine")
    assert main(args(d, out, "--max-steps", "3", "--overwrite")) == 0
    assert [r["step"] for r in map(json.loads, open(out / "log.jsonl"))] == [0, 1, 2, 3]
    assert json.load(open(out / "run.json"))["config"]["max_steps"] == 3
    assert (out / "notes.txt").read_text() == "mine"
    assert main(args(d, out, "--resume", "--overwrite")) == 2
    # a folder of other files is no run's: refused, nothing written into it
    other = tmp_path / "thesis"
    other.mkdir()
    (other / "thesis.txt").write_text("chapter 1")
    capsys.readouterr()
    assert main(args(d, other, "--max-steps", "2")) == 2
    assert "not empty" in capsys.readouterr().err and os.listdir(other) == ["thesis.txt"]


def test_an_overwritten_run_does_not_resume_the_earlier_runs_checkpoint(setup, tmp_path):
    """--overwrite interrupted before its first save (here: Ctrl-C in its
    step-0 evaluation) leaves the earlier run's last/ beside the new run's
    log: --resume refuses that checkpoint."""
    d = setup
    out = tmp_path / "run"
    assert main(args(d, out, "--max-steps", "2")) == 0
    earlier_id = json.load(open(out / "run.json"))["run_id"]
    np.save(tmp_path / "long.npy", np.zeros(2_000_000, np.int32))  # an evaluation of many seconds
    slow_start = ["--overwrite", "--eval-text", str(tmp_path / "long.npy"), "--eval-text-tokens", "all"]
    proc, err = interrupted_finetune(args(d, out, *slow_start),
                                     ready=lambda: json.load(open(out / "run.json")).get("run_id") != earlier_id)
    assert proc.returncode == 130 and "nothing saved by this run" in err and "Traceback" not in err, err[-3000:]
    r = subprocess.run([sys.executable, os.path.join(ROOT, "python", "finetune.py"), *args(d, out, "--resume")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "another run's checkpoint" in r.stderr, r.stderr[-3000:]


def test_the_token_cache_is_shared_by_runs(setup, tmp_path, private_cache):
    """Text data with the checkpoint's tokenizer: tokenized by the first run
    only; a run into another --output reads the same cache file."""
    d = setup
    shutil.copytree(d / "ckpt", tmp_path / "ckpt")
    char_tokenizer().save_pretrained(tmp_path / "ckpt")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text("the cat sat on the mat. " * 200)
    (tmp_path / "data" / "b.jsonl").write_text("".join(json.dumps(dict(text=f"a dog, {i}.")) + "\n" for i in range(300)))

    def run(out):
        return main([str(tmp_path / "ckpt"), *args(d, out, "--max-steps", "1")[1:], "--data", str(tmp_path / "data")])

    assert run(tmp_path / "a") == 0
    (cached,) = os.listdir(private_cache / "tokens")
    before = os.stat(private_cache / "tokens" / cached)
    assert run(tmp_path / "b") == 0
    assert os.listdir(private_cache / "tokens") == [cached]
    after = os.stat(private_cache / "tokens" / cached)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert not os.path.exists(tmp_path / "b" / "token_cache")


def test_the_token_cache_key_is_the_data_and_the_tokenizer(tmp_path, private_cache):
    from mha2mla.training import tokenize_corpus

    text = tmp_path / "a.txt"
    text.write_text("a cab.\n")
    ab, ba = char_tokenizer(), char_tokenizer("bacdefghijklmnopqrstuvwxyz .,\n")  # same name, other vocabulary
    assert ab.name_or_path == ba.name_or_path
    t_ab = np.asarray(tokenize_corpus([str(text)], ab, None, False))
    t_ba = np.asarray(tokenize_corpus([str(text)], ba, None, False))
    assert list(t_ab) == ab("a cab.\n", add_special_tokens=False)["input_ids"] + [ab.eos_token_id]
    assert list(t_ba) != list(t_ab) and len(os.listdir(private_cache / "tokens")) == 2
    stat = os.stat(text)
    text.write_text("a bad.\n")  # same size: the modification time tells
    os.utime(text, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert list(tokenize_corpus([str(text)], ab, None, False)) == ab("a bad.\n")["input_ids"] + [ab.eos_token_id]
    assert len(os.listdir(private_cache / "tokens")) == 3


def test_missing_or_bad_training_data_is_named_as_such(setup, tmp_path, capsys):
    d = setup
    assert main([*args(d, tmp_path / "x"), "--data", str(tmp_path / "nothing.txt")]) == 2
    err = capsys.readouterr().err
    assert "training data not found" in err and "calibration" not in err and not (tmp_path / "x").exists()
    with pytest.raises(FileNotFoundError, match="training data not found"):
        from mha2mla.training import tokenize_corpus

        tokenize_corpus([str(tmp_path / "nothing.npy")], None, None, False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    from mha2mla.training import tokenize_corpus

    with pytest.raises(ValueError, match="bad.jsonl:2"):
        tokenize_corpus([str(bad)], char_tokenizer(), None, False)
    assert os.listdir(tmp_path / "cache" / "tokens") == []  # no partial cache file left


def test_the_corpus_reads_documents_for_calibration_too(tmp_path):
    from mha2mla.calibration import sample_sequences
    from mha2mla.corpus import corpus_files

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.jsonl").write_text("".join(json.dumps(dict(text="abc " * 6)) + "\n" for _ in range(50)))
    (tmp_path / "docs" / "skipped.bin").write_text("not text")
    assert corpus_files([str(tmp_path / "docs")]) == [str(tmp_path / "docs" / "a.jsonl")]
    ids = sample_sequences(char_tokenizer(), [str(tmp_path / "docs")], 3, 12)
    assert ids.shape == (3, 12) and set(ids.flatten().tolist()) <= {0, 1, 2, 26}  # the "text" fields' letters only
    with pytest.raises(FileNotFoundError, match="calibration data not found"):
        sample_sequences(char_tokenizer(), [str(tmp_path / "none")], 1, 4)


def test_help_explains_every_flag():
    from mha2mla.finetune_cli import build_parser

    parser = build_parser()
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.dest == "help":
            continue
        text = formatter._expand_help(action) if action.help else ""
        words = set(action.dest.split("_"))
        content = [w for w in text.replace("-", " ").replace("(", " ").split() if w.strip(".,:;").lower() not in words]
        assert len(content) >= 4, f"--{action.dest}: {text!r} says little more than its name"
        assert text.count("(default") <= 1, f"--{action.dest} says its default twice: {text!r}"
