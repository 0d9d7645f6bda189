"""The command lines convert.py and evaluate.py as a user meets them: bad
arguments, paths and architectures refused in one line before anything
loads, nothing of the user's lost, results said where they are; every
command's usage line and errors named as the user ran it."""
import importlib
import importlib.util
import json
import os
import sys
import time

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mha2mla import ConversionOptions, convert_model, load_mla_model, save_mla_model  # noqa: E402
from mha2mla.convert_cli import main as convert  # noqa: E402
from mha2mla.evaluate_cli import main as evaluate  # noqa: E402
from test_conversion import IDS, logits, stats_for, tiny_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = "The quick brown fox jumps over the lazy dog. " * 40 + "\n"


def char_tokenizer():
    """One token per printable ASCII character (96 ids, under the tiny model's 97)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, **{chr(c): i + 1 for i, c in enumerate(range(32, 127))}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A config-only folder (loading its weights would fail), a complete tiny
    Llama folder, a text file, and a converted checkpoint with a tokenizer."""
    d = tmp_path_factory.mktemp("cli")
    model = tiny_model("gqa")
    model.config.save_pretrained(d / "config_only")
    model.save_pretrained(d / "llama")
    tok = char_tokenizer()
    tok.save_pretrained(d / "llama")
    (d / "text.txt").write_text(TEXT * 4)
    convert_model(model, stats_for(model), ConversionOptions(r=2, d_kv=6), progress=False)
    save_mla_model(model, str(d / "ckpt"), tok)
    return d


def run(main, argv, capsys):
    """(exit code, stderr lines, stdout, seconds) of main(argv)."""
    capsys.readouterr()
    t = time.time()
    rc = main([str(a) for a in argv])
    seconds = time.time() - t
    captured = capsys.readouterr()
    return rc, captured.err.splitlines(), captured.out, seconds


def refused(main, argv, capsys, match):
    """The command exits 2 with one line on stderr containing `match`, no traceback."""
    rc, err, _, seconds = run(main, argv, capsys)
    assert rc == 2 and len(err) == 1, err
    assert match in err[0] and "Traceback" not in err[0], err[0]
    return seconds


# ------------------------------------------------------------ every command --

def console_scripts() -> dict:
    """pyproject.toml's [project.scripts]: command name -> "module:function"."""
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]["scripts"]


def script_files() -> dict:
    """python/<name>.py -> the module whose main() it runs."""
    found = {}
    for name in sorted(os.listdir(os.path.join(ROOT, "python"))):
        if name.endswith(".py"):
            text = open(os.path.join(ROOT, "python", name)).read()
            found.update({name: line.split()[1] for line in text.splitlines() if line.startswith("from mha2mla.")})
    return found


COMMANDS = [(os.path.join(sys.prefix, "bin", name), target) for name, target in sorted(console_scripts().items())]
COMMANDS += [(os.path.join("python", name), module + ":main") for name, module in script_files().items()]


@pytest.mark.parametrize("argv0,target", COMMANDS, ids=[os.path.basename(a) for a, _ in COMMANDS])
def test_usage_names_the_command_the_user_ran(argv0, target, monkeypatch, capsys):
    """`mha2mla-convert --help` says `usage: mha2mla-convert`, `python
    python/convert.py --help` says `usage: convert.py`, as argparse takes
    them from sys.argv[0] (a console script sets it to its own path)."""
    module, function = target.split(":")
    main = getattr(importlib.import_module(module), function)
    monkeypatch.setattr(sys, "argv", [argv0, "--help"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: {os.path.basename(argv0)} ")


@pytest.mark.parametrize("command", ["mha2mla-convert", "convert.py"])
def test_errors_start_with_the_command_the_user_ran(command, files, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [command])
    rc, err, _, _ = run(convert, ["--model", files / "config_only", "--r", "0"], capsys)
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"{command}: --r 0"), err


# ---------------------------------------------------------------- convert.py --

@pytest.mark.parametrize("args,match", [
    (["--d-kv", "100000"], "--d-kv 100000: at most 30"),
    (["--d-kv", "-3"], "--d-kv -3"),
    (["--r", "0"], "--r 0"),
    (["--r", "1000"], "--r 1000: must be in [1, 8]"),
    (["--r", "8", "--d-kv", "17"], "--d-kv 17: at most 16"),
    (["--ppl-stride", "4096"], "--ppl-stride 4096"),
    (["--calib-seqs", "0"], "--calib-seqs 0"),
])
def test_bad_arguments_are_refused_before_any_weight_loads(files, tmp_path, capsys, monkeypatch, args, match):
    monkeypatch.chdir(tmp_path)  # the default output folder lands here
    seconds = refused(convert, ["--model", files / "config_only", "--device", "cpu", *args], capsys, match)
    assert seconds < 0.5
    assert os.listdir(tmp_path) == []


def test_the_largest_d_kv_passes_validation(files, tmp_path, capsys):
    """The bound is not too strict: d_kv at the limit reaches the next check
    (the config-only folder has no weights)."""
    refused(convert, ["--model", files / "config_only", "--d-kv", "30", "--output", tmp_path / "o"], capsys,
            "has config.json but no weights")


def test_an_unsupported_architecture_is_refused_from_its_config(tmp_path, capsys):
    cfg = transformers.Gemma3TextConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, vocab_size=97,
                                        head_dim=16, num_attention_heads=4, num_key_value_heads=2)
    cfg.save_pretrained(tmp_path / "gemma")
    seconds = refused(convert, ["--model", tmp_path / "gemma"], capsys, "q_norm")
    assert seconds < 0.5
    qwen3 = transformers.Qwen3Config(hidden_size=64, intermediate_size=96, num_hidden_layers=1, vocab_size=97,
                                     head_dim=16, num_attention_heads=4, num_key_value_heads=2)
    qwen3.save_pretrained(tmp_path / "qwen3")
    refused(convert, ["--model", tmp_path / "qwen3"], capsys, "model_type qwen3 applies a per-head q_norm")


def test_a_converted_checkpoint_is_not_converted_again(files, capsys):
    refused(convert, ["--model", files / "ckpt"], capsys, "already converted to MLA")


def test_paths_that_are_not_models_get_one_line(tmp_path, capsys):
    refused(convert, ["--model", tmp_path / "nowhere"], capsys, "nowhere does not exist")
    refused(convert, ["--model", tmp_path / "nowhere.gguf"], capsys, "nowhere.gguf does not exist")
    (tmp_path / "thesis.txt").write_text("not a model")
    refused(convert, ["--model", tmp_path], capsys, "is not a model folder: it has no config.json")
    refused(convert, ["--model", tmp_path / "thesis.txt"], capsys, "is a file, not a model")
    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    refused(convert, ["--model", tmp_path / "bad.gguf"], capsys, "not a readable GGUF file")


def test_missing_data_is_refused_before_loading(files, tmp_path, capsys):
    base = ["--model", files / "config_only", "--output", tmp_path / "o"]
    # the config-only folder fails at the weights check first: use the full one
    base[1] = files / "llama"
    refused(convert, base + ["--ppl-data", tmp_path / "none.txt"], capsys, "--ppl-data")
    refused(convert, base + ["--ppl-windows", "0", "--calib-data", tmp_path / "none"], capsys,
            "--calib-data: calibration data not found")


def test_an_output_folder_of_the_users_is_refused_and_kept(files, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.txt").write_text("four years")
    # the config-only model proves the output is checked before any loading
    seconds = refused(convert, ["--model", files / "config_only", "--output", out], capsys, "not a checkpoint")
    assert seconds < 0.5
    refused(convert, ["--model", files / "config_only", "--output", out, "--overwrite"], capsys, "not a checkpoint")
    assert os.listdir(out) == ["thesis.txt"] and (out / "thesis.txt").read_text() == "four years"


def test_convert_replaces_a_checkpoint_only_with_overwrite(files, tmp_path, capsys):
    out = tmp_path / "ck"
    argv = ["--model", files / "llama", "--output", out, "--calib-data", files / "text.txt", "--calib-seqs", "4",
            "--calib-len", "32", "--ppl-data", files / "text.txt", "--ppl-context", "64", "--ppl-stride", "32",
            "--ppl-windows", "2", "--r", "2", "--d-kv", "6", "--device", "cpu", "--quiet"]
    rc, err, out_text, _ = run(convert, argv, capsys)
    assert rc == 0, err
    assert f"checkpoint: {out}" in out_text
    if importlib.util.find_spec("matplotlib"):  # the heat map is drawn where matplotlib is installed
        # the terminal gets the plot's path, the Markdown file its image link
        assert f"plot: {out / 'rope_frequencies.png'}" in out_text.splitlines() and "![" not in out_text
        assert "![kept RoPE frequencies](rope_frequencies.png)" in (out / "conversion_report.md").read_text()
    # the report names the data it read
    data = json.loads((out / "conversion_report.json").read_text())["data"]
    assert data == dict(calibration=[str(files / "text.txt")], perplexity=str(files / "text.txt"))
    assert f"Data: calibration from {files / 'text.txt'}; perplexity on {files / 'text.txt'}." in (
        out / "conversion_report.md").read_text()
    files_written = set(json.loads((out / "checkpoint_files.json").read_text())["files"])
    assert {"conversion_report.json", "conversion_report.md", "model.safetensors", "tokenizer.json"} <= files_written
    first = logits(load_mla_model(str(out)), IDS)
    (out / "thesis.txt").write_text("mine")
    refused(convert, argv, capsys, f"{out} already holds a checkpoint: add --overwrite to replace it")
    assert "overwrite=True" not in run(convert, argv, capsys)[1][0]  # the Python argument, not this command's
    rc, err, _, _ = run(convert, argv + ["--d-kv", "4", "--overwrite"], capsys)
    assert rc == 0, err
    assert (out / "thesis.txt").read_text() == "mine"
    assert json.loads((out / "conversion_report.json").read_text())["options"]["d_kv"] == 4
    assert not torch.equal(logits(load_mla_model(str(out)), IDS), first)
    assert sorted(os.listdir(tmp_path)) == ["ck"]
    # the report points to fine-tuning where the one-shot model lost quality, and only there
    from mha2mla import report

    rep = json.loads((out / "conversion_report.json").read_text())
    rep["ppl_converted"] = dict(rep["ppl_original"], ppl=3 * rep["ppl_original"]["ppl"])
    assert "`mha2mla-finetune` recovers" in report.markdown(rep)
    rep["ppl_converted"]["ppl"] = rep["ppl_original"]["ppl"]
    assert "mha2mla-finetune" not in report.markdown(rep)


# --------------------------------------------------------------- evaluate.py --

@pytest.fixture(scope="module")
def mc_data(tmp_path_factory):
    """A three-question ARC-Easy file where the evaluation looks for one."""
    root = tmp_path_factory.mktemp("mc")
    (root / "arc_easy").mkdir()
    rows = [{"question": {"stem": f"What is {a}?", "choices": [{"text": t, "label": l} for t, l in
                                                                 (("yes", "A"), ("no", "B"))]}, "answerKey": "A"}
            for a in ("up", "down", "left")]
    (root / "arc_easy" / "ARC-Easy-Test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_evaluate_refuses_a_corrupted_checkpoint_in_one_line(files, mc_data, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(files / "ckpt", bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    argv = ["--tasks", "arc_easy", "--data", mc_data, "--device", "cpu", "--quiet", "--out", tmp_path / "ev"]
    refused(evaluate, [bad, *argv], capsys, "truncated or corrupted")
    (bad / "config.json").write_text('{"mla": ')
    refused(evaluate, [bad, *argv], capsys, "config.json is corrupted")
    refused(evaluate, [tmp_path / "nowhere", *argv], capsys, "nowhere does not exist")
    assert not (tmp_path / "ev").exists()


def test_evaluate_names_the_flag_of_missing_multiple_choice_data(files, mc_data, tmp_path, capsys):
    """mc_data holds ARC-Easy only: PIQA's files are missing."""
    argv = [files / "ckpt", "--data", mc_data, "--device", "cpu", "--quiet", "--out", tmp_path / "ev"]
    refused(evaluate, argv + ["--tasks", "arc_easy,piqa"], capsys,
            f"--data {mc_data}: piqa needs {mc_data / 'piqa' / 'valid-labels.lst'}, which does not exist")
    refused(evaluate, argv + ["--tasks", "mmlu"], capsys, f"mmlu needs {mc_data / 'mmlu' / 'test'}, which does not")
    assert not (tmp_path / "ev").exists()


def test_evaluate_checks_its_arguments_first(files, tmp_path, capsys):
    refused(evaluate, [files / "ckpt", "--tasks", "nonsense"], capsys, "unknown task")
    refused(evaluate, [files / "ckpt", "--tasks", "wikitext", "--ppl-data", tmp_path / "none.txt"], capsys,
            "--ppl-data")
    refused(evaluate, [files / "ckpt", "--batch-size", "0"], capsys, "--batch-size 0")
    # the default tasks with readable text (without a data folder its default would be refused first)
    refused(evaluate, ["original", "--source", tmp_path / "nowhere", "--ppl-data", files / "text.txt"], capsys,
            "nowhere does not exist")


def test_evaluate_says_where_it_wrote_and_defaults_to_the_working_directory(files, mc_data, tmp_path, capsys,
                                                                            monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, err, out, _ = run(evaluate, [files / "ckpt", "original", "--source", files / "llama", "--tasks", "arc_easy",
                                     "--data", mc_data, "--device", "cpu", "--quiet"], capsys)
    assert rc == 0, err
    stem = os.path.join(os.path.realpath(tmp_path), "evaluations", "evaluation_cpu")
    assert f"results: {stem}.json, {stem}.md" in out
    res = json.loads(open(f"{stem}.json").read())
    assert [m["model"] for m in res["models"]] == [str(files / "ckpt"), str(files / "llama")]
    assert all(m["scores"]["arc_easy"]["n"] == 3 for m in res["models"])


def test_evaluate_scores_perplexity_on_the_given_text(files, tmp_path, capsys):
    rc, err, out, _ = run(evaluate, [files / "ckpt", "--tasks", "wikitext", "--ppl-data", files / "text.txt",
                                     "--ppl-context", "64", "--ppl-stride", "32", "--limit", "2", "--device", "cpu",
                                     "--quiet", "--out", tmp_path], capsys)
    assert rc == 0, err
    (row,) = json.loads((tmp_path / "evaluation_cpu.json").read_text())["models"]
    assert row["scores"]["wikitext"]["windows"] == 2 and row["scores"]["wikitext"]["ppl"] > 1
