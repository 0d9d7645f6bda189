"""Command line of fine-tuning (mha2mla-finetune, python/finetune.py). One
process, or several through torchrun (DDP; NCCL on GPUs, gloo on CPU), with
the same script.

An --output folder holds one run: run.json (what it is), log.jsonl (one
record per step, evaluations included), last/ (the latest checkpoint, with
the optimizer state to resume from) and loss_curve.png. Ctrl-C, --max-minutes
and --stop-after all end a run with a checkpoint that --resume continues."""
import argparse
import dataclasses
import gc
import json
import math
import os
import signal
import sys
import threading
import time
import uuid

import torch

from .attention_transfer import TeacherAttentionTaps, attention_transfer_loss
from .cli_args import command_name
from .corpus import default_corpus
from .results import pyplot
from .shared_data import DATA_HINT
from .sharding import full_tensor
from .training import (OBJECTIVES, TRAIN_SCOPES, PackedData, TrainConfig, eval_text_loss, heldout_loss, load_state,
                       loss_fn, lr_at, param_groups, save_checkpoint, text_sequences, tokenize_corpus)

RUN_FILES = ("run.json", "log.jsonl", "last", "loss_curve.png")  # what a run writes into --output
EXIT_INTERRUPTED = 130  # the shell's code for a process ended by SIGINT


def token_count(text: str) -> int:
    """--eval-text-tokens: a count of tokens, or "all" (0)."""
    if text.strip().lower() == "all":
        return 0
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"{text}: give a number of tokens >= 0, or all")
    return n


CHOICES = dict(objective=OBJECTIVES, train=TRAIN_SCOPES)
TYPES = dict(eval_text_tokens=token_count)
HELP = dict(
    lr="peak learning rate of AdamW (betas 0.9, 0.95), reached after --warmup-steps",
    new_proj_lr_mult="learning-rate multiplier of the projections the conversion created (kv_down, k_up, v_up, "
    "k_rope_proj, q_rope_map)",
    weight_decay="AdamW weight decay of the weight matrices (norms and biases get none)",
    clip="largest global L2 norm of the gradients; larger ones are scaled down to it",
    warmup_steps="steps of linear learning-rate warmup up to --lr",
    decay_frac="final fraction of --max-steps over which the learning rate decays to 0 (1 - sqrt shape)",
    max_steps="optimizer steps of the whole schedule (a resumed run counts on from its checkpoint's step)",
    batch_size="sequences per micro-batch and process; evaluations run in batches of this size too",
    grad_accum="micro-batches summed into one optimizer step: tokens per step = --batch-size x --grad-accum x "
    "--seq-len x processes",
    seq_len="tokens per training and evaluation sequence",
    train="which parameters train under --objective lm: all, or attention projections and norms only",
    objective="lm: next-token cross-entropy and/or KL to --teacher (--distill-weight); attention: attention "
    "transfer, each layer's attention output matched to the teacher's from the teacher's own layer input "
    "(trains attention weights only; a first stage, run lm after it from its checkpoint)",
    distill_weight="weight of the KL to the teacher's logits in the loss: 0 = cross-entropy only, 1 = KL only, "
    "between = a mix",
    distill_temperature="softmax temperature of both sides of the KL to the teacher (the KL is scaled by its "
    "square)",
    eval_every="steps between evaluations (held-out loss, and --eval-text); also at step 0 and at the last step",
    eval_batches="batches of --batch-size sequences from the training data's held-out 1%% scored per held-out "
    "loss",
    eval_text_tokens="tokens of --eval-text scored per evaluation, from the start of the file in whole "
    "sequences of --seq-len; 0 or all = the whole file (WikiText-2 valid: 274k tokens, about 10 minutes "
    "per evaluation for a 135M model on a CPU)",
    log_every="steps between writes of log.jsonl (reading losses back waits for the GPU)",
    save_every="steps between checkpoints into <output>/last (each replaces the previous one; one is saved "
    "at the end and whenever the run stops early too)",
    seed="seed of the order of training sequences",
)


class DefaultsWhereMeaningful(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None and False and those the help text already names."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser():
    p = argparse.ArgumentParser(
        description="Fine-tune a converted (MLA) checkpoint to recover quality: cross-entropy and optional KL "
        "distillation from the original model; resumable (Ctrl-C saves a checkpoint); DDP or FSDP through "
        "torchrun.",
        formatter_class=DefaultsWhereMeaningful,
    )
    p.add_argument("checkpoint", help="converted checkpoint folder to start from (what mha2mla-convert wrote)")
    p.add_argument("--output", required=True,
                   help="folder of this run: last/ (checkpoint), log.jsonl, run.json, loss_curve.png; a new or "
                   "empty folder, or an earlier run's with --resume or --overwrite")
    p.add_argument("--data", nargs="+", default=None,
                   help="training data: text files, folders (their .txt/.jsonl/.raw/.md files), .jsonl (a JSON "
                   "object with a \"text\" field a line) or pre-tokenized .npy token arrays (default: the shared "
                   f"corpus, {default_corpus()})")
    p.add_argument("--cache-dir", default=None,
                   help="token cache shared by runs: each data set is tokenized once per tokenizer (default: "
                   "tokens/ under $MHA2MLA_CACHE, else $XDG_CACHE_HOME/mha2mla, else ~/.cache/mha2mla)")
    p.add_argument("--teacher", default=None, help="original model for distillation and attention transfer (HF "
                   "folder, hub id or .gguf; 'default' = SmolLM2-135M-Instruct); needed when --distill-weight > 0 "
                   "or --objective attention")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --output from its last/ checkpoint (weights, optimizer, step, RNG); "
                   "its log keeps the steps up to that checkpoint; without last/ the run starts over")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in an --output that holds an earlier one: log.jsonl and run.json start "
                   "afresh, last/ is replaced at the first save; files the run did not write are kept")
    p.add_argument("--stop-after", type=int, default=0,
                   help="stop after this many optimizer steps of this run, saving a resumable checkpoint; "
                   "0 = no limit")
    p.add_argument("--max-minutes", type=float, default=0.0,
                   help="stop this run after so many minutes of training, saving a resumable checkpoint (the "
                   "schedule is still that of --max-steps: set both so the decay is reached); 0 = no limit")
    p.add_argument("--eval-text", default=None,
                   help="a text file or pre-tokenized .npy (e.g. WikiText-2 valid) whose loss and perplexity, "
                   "over packed sequences of --seq-len tokens, are logged at every evaluation: quality on text "
                   "outside the training corpus; --eval-text-tokens caps what is scored")
    p.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:N, or auto (a GPU if there is one; under torchrun the local rank's)")
    p.add_argument("--quiet", action="store_true", help="no progress bars (tokenizing, training, evaluations)")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun, shard parameters, gradients and optimizer state across the processes "
                   "(FSDP2: one unit per attention block and per MLP) instead of replicating them (DDP): for "
                   "models that do not fit one GPU; checkpoints still hold the whole model")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "betas":
            continue
        p.add_argument("--" + f.name.replace("_", "-"), type=TYPES.get(f.name, type(f.default)), default=f.default,
                       choices=CHOICES.get(f.name), help=HELP[f.name])
    return p


def output_refusal(output: str, resume: bool, overwrite: bool):
    """Why a run may not write into `output` (one line), or None."""
    if resume and overwrite:
        return "--resume continues the run in --output and --overwrite starts a new one: give one of them"
    if not os.path.isdir(output):
        return f"--output {output} is a file, not a folder" if os.path.exists(output) else None
    entries = os.listdir(output)
    if not entries:
        return None
    if not any(name in entries for name in RUN_FILES):
        return (f"--output {output} is not empty and holds no fine-tuning run: give a new or empty folder "
                "(nothing in it is replaced)")
    if not (resume or overwrite):
        return (f"--output {output} holds an earlier run: continue it with --resume, or start a new one there "
                "with --overwrite")
    return None


def trim_log(log_path: str, first_new_step: int) -> None:
    """Drops the records of steps >= first_new_step from the log (those a
    resumed run writes again), atomically."""
    if not os.path.isfile(log_path):
        return
    with open(log_path) as f:
        lines = [line for line in f if line.strip()]
    kept = [line for line in lines if json.loads(line)["step"] < first_new_step]
    if len(kept) == len(lines):
        return
    tmp = f"{log_path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, log_path)


class Interruption:
    """Ctrl-C during training. The first SIGINT asks the loop to stop after
    the step it is in and save a resumable checkpoint, as --max-minutes
    does; one more, a second or more later, stops at once without saving.
    (Under torchrun a process may receive the terminal's SIGINT and the
    launcher's forwarded copy together: those count as one.)"""

    def __init__(self, announce: bool = True):
        self.requested_at = None
        self.announce = announce  # one process of a torchrun job says what happens
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _on_sigint(self, signum, frame):
        now = time.monotonic()
        if self.requested_at is None:
            self.requested_at = now
            if self.announce:
                print(f"\n{command_name()}: Ctrl-C: saving a checkpoint after this step (Ctrl-C again: quit without "
                      "saving)", file=sys.stderr)
        elif now - self.requested_at > 1.0:
            raise KeyboardInterrupt

    @property
    def requested(self) -> bool:
        return self.requested_at is not None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    saved = dict(path=None, step=None)  # the latest checkpoint this run saved, for the message on a hard stop
    try:
        rc = finetune(args, saved)
    except KeyboardInterrupt:  # a second Ctrl-C: quit now, leaving the group to the process's exit
        where = (f"{saved['path']} holds step {saved['step']}; continue with the same command plus --resume"
                 if saved["path"] else "nothing saved by this run")
        print(f"\n{command_name()}: interrupted: {where}", file=sys.stderr)
        return EXIT_INTERRUPTED
    leave_process_group()
    return rc


def leave_process_group() -> None:
    """This process's end of a torchrun job that returned (finished,
    stopped, refused): the run's sharded modules and optimizer, and the
    collectives they may still hold, are freed first (they form reference
    cycles), while the group and the interpreter are alive; then the group
    goes. Left to the interpreter's exit, gloo's threads can outlive what
    they use: the process aborts ("terminate called without an active
    exception") after a run that had finished. A run that raised leaves
    the group as it is: another process may still be inside a collective
    with it, and destroying the group could then wait on it."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gc.collect()
        torch.distributed.destroy_process_group()


def finetune(args, saved: dict) -> int:
    from .checkpoint import CheckpointError, load_mla_model

    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if f.name != "betas"})
    needs_teacher = cfg.distill_weight > 0 or cfg.objective == "attention"
    if needs_teacher and not args.teacher:
        print(f"{command_name()}: --distill-weight > 0 and --objective attention need --teacher (the original model)",
              file=sys.stderr)
        return 2
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if args.fsdp and world < 2:
        print(f"{command_name()}: --fsdp shards the model across processes: start it with torchrun --nproc-per-node N, "
              "N >= 2", file=sys.stderr)
        return 2
    # every check of the command line before anything is loaded or written
    refusal = output_refusal(args.output, args.resume, args.overwrite)
    if refusal is None and not os.path.isdir(args.checkpoint):
        refusal = f"checkpoint {args.checkpoint} not found: give a folder that mha2mla-convert wrote"
    paths = args.data or [default_corpus()]
    missing = [p for p in paths if not os.path.exists(p)]
    if refusal is None and missing:
        refusal = f"training data not found: {missing[0]}: give --data, or {DATA_HINT}"
    if refusal is None and args.eval_text and not os.path.isfile(args.eval_text):
        refusal = f"--eval-text {args.eval_text}: no such file"
    has_tokenizer = os.path.exists(os.path.join(args.checkpoint, "tokenizer_config.json"))
    if refusal is None and not has_tokenizer and any(not p.endswith(".npy") for p in paths):
        refusal = "the checkpoint has no tokenizer; give pre-tokenized .npy data"
    if refusal is None and not has_tokenizer and args.eval_text and not args.eval_text.endswith(".npy"):
        refusal = "the checkpoint has no tokenizer; give --eval-text as pre-tokenized .npy"
    if refusal:
        print(f"{command_name()}: {refusal}", file=sys.stderr)
        return 2
    if args.device == "auto":
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and device.index is None:  # set_device needs an index
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if world > 1:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    last_dir = os.path.join(args.output, "last")
    run_json = os.path.join(args.output, "run.json")
    earlier_run = {}
    if args.resume and os.path.isfile(run_json):
        with open(run_json) as f:
            earlier_run = json.load(f)
    run_id = earlier_run.get("run_id") or uuid.uuid4().hex  # ties last/ to the log it continues
    start = args.checkpoint
    state = None
    if args.resume and os.path.isdir(last_dir):
        start, state = last_dir, load_state(last_dir)
        if state is not None and bool(state.get("sharded")) != args.fsdp:
            print(f"{command_name()}: {last_dir} was saved {'with' if state.get('sharded') else 'without'} --fsdp: "
                  "resume it the same way", file=sys.stderr)
            return 2
        if state is not None and state.get("run_id") and earlier_run.get("run_id") not in (None, state["run_id"]):
            print(f"{command_name()}: {last_dir} is another run's checkpoint than {run_json} describes (--overwrite "
                  "started a new run that saved none yet): start again with --overwrite", file=sys.stderr)
            return 2
    # a sharded model is loaded on the CPU; each process moves only its shards to its GPU
    load_device = torch.device("cpu") if args.fsdp else device
    try:
        model = load_mla_model(start, torch.float32, load_device)
    except CheckpointError as e:
        print(f"{command_name()}: {e}", file=sys.stderr)
        return 2
    mesh = None
    if args.fsdp:
        from .sharding import make_mesh, shard_model

        mesh = make_mesh(device, world)
        shard_model(model, mesh)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.checkpoint) if has_tokenizer else None
    try:
        if rank == 0:  # the other processes read what rank 0 tokenized
            tokenize_corpus(paths, tok, args.cache_dir, not args.quiet)
        if world > 1:
            torch.distributed.barrier()
        train_data = PackedData(tokenize_corpus(paths, tok, args.cache_dir, False), cfg.seq_len, seed=cfg.seed)
        eval_text = text_sequences(args.eval_text, tok, cfg.seq_len, args.cache_dir) if args.eval_text else None
    except (OSError, ValueError) as e:
        print(f"{command_name()}: {e}", file=sys.stderr)
        return 2
    teacher = None
    if needs_teacher:
        from .source import load_source

        # bf16 on GPUs: the teacher only runs forward under bf16 autocast anyway
        teacher = load_source(None if args.teacher == "default" else args.teacher,
                              torch.bfloat16 if device.type == "cuda" else torch.float32, load_device,
                              with_tokenizer=False)[0].eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        if mesh is not None:
            shard_model(teacher, mesh)
    taps = TeacherAttentionTaps(teacher) if cfg.objective == "attention" else None
    groups = param_groups(model, cfg)
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=device.type == "cuda" and not args.fsdp)
    step = 0
    if state is not None:
        if args.fsdp:
            from .sharding import load_full_optimizer_state

            load_full_optimizer_state(model, opt, state["optimizer"])
        else:
            opt.load_state_dict(state["optimizer"])
        step = int(state["step"])
        torch.set_rng_state(state["rng"])
    # Attention transfer calls the attention modules directly, not the model's
    # forward that DDP wraps: its gradients are averaged by hand instead.
    # FSDP averages gradients itself, whichever forward produced them.
    ddp = world > 1 and cfg.objective == "lm" and not args.fsdp
    train_model = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
    model.train()
    log_path = os.path.join(args.output, "log.jsonl")
    if rank == 0:
        os.makedirs(args.output, exist_ok=True)
        if args.overwrite:  # the earlier run's log and curve; last/ is replaced at the first save
            for name in ("log.jsonl", "loss_curve.png"):
                if os.path.isfile(os.path.join(args.output, name)):
                    os.remove(os.path.join(args.output, name))
        # a resumed run writes again from the step after its checkpoint (from step 0 without one)
        trim_log(log_path, step + 1 if step > 0 else 0)
        with open(run_json, "w") as f:  # what this run is, for reports and for repeating it
            json.dump(dict(checkpoint=args.checkpoint, data=paths, teacher=args.teacher, world_size=world,
                           fsdp=args.fsdp, eval_text=args.eval_text, run_id=run_id, config=dataclasses.asdict(cfg)),
                      f, indent=1)
    from tqdm.auto import tqdm

    progress = not args.quiet and rank == 0
    seqs_per_step = cfg.batch_size * cfg.grad_accum * world

    def evaluate(rec: dict) -> dict:
        rec["heldout_loss"] = heldout_loss(model, train_data, cfg, device, progress)
        if eval_text is not None:
            rec["eval_text_loss"], rec["eval_text_tokens"] = eval_text_loss(model, eval_text, cfg, device, progress)
            rec["eval_text_ppl"] = math.exp(rec["eval_text_loss"])
        return rec

    if step == 0:  # the converted model before any training: the start of the quality curve
        first_rec = evaluate(dict(step=0, tokens=0))  # every process: a sharded model's forward is collective
        if rank == 0:
            with open(log_path, "a") as f:
                f.write(json.dumps(first_rec) + "\n")
    bar = tqdm(total=cfg.max_steps, initial=step, desc="fine-tune", disable=not progress)
    pending = []  # records whose losses are still GPU tensors: read back every log_every steps, not every step
    run_steps = 0
    run_start, run_tokens = time.time(), 0
    out_of_time = interrupted = False
    with Interruption(announce=rank == 0) as interruption:
        while step < cfg.max_steps:
            lr = lr_at(step, cfg)
            for g in opt.param_groups:
                g["lr"] = lr * g.get("lr_mult", 1.0)
            step_loss = step_ce = 0.0  # means over the step's micro-batches
            layer_errors = None
            for micro in range(cfg.grad_accum):
                pos = step * seqs_per_step + (micro * world + rank) * cfg.batch_size
                batch = train_data.train_batch(pos, cfg.batch_size)
                batch = batch.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else batch
                with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                    if taps is not None:
                        loss, errors = attention_transfer_loss(model, teacher, taps, batch[:, :-1])
                        layer_errors = errors / cfg.grad_accum + (0 if layer_errors is None else layer_errors)
                    else:
                        logits = train_model(input_ids=batch[:, :-1], use_cache=False).logits
                        teacher_logits = teacher(input_ids=batch[:, :-1], use_cache=False).logits \
                            if teacher is not None else None
                if taps is None:
                    loss, ce = loss_fn(logits, batch[:, 1:], teacher_logits, cfg)
                    step_ce = step_ce + ce.detach() / cfg.grad_accum
                (loss / cfg.grad_accum).backward()
                step_loss = step_loss + loss.detach() / cfg.grad_accum
            if world > 1 and not ddp and not args.fsdp:
                for p in params:
                    if p.grad is not None:
                        torch.distributed.all_reduce(p.grad)
                        p.grad /= world
            grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(params, cfg.clip))
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            run_steps += 1
            run_tokens += seqs_per_step * cfg.seq_len
            rec = dict(step=step, loss=step_loss, lr=lr, grad_norm=grad_norm,
                       tokens=step * seqs_per_step * cfg.seq_len)
            if taps is None:
                rec["ce"] = step_ce
            if args.max_minutes:
                out_of_time = time.time() - run_start > 60 * args.max_minutes
            if world == 1:
                interrupted = interruption.requested
            elif args.max_minutes or step % cfg.log_every == 0:
                # one decision for all processes: rank 0's clock, anyone's Ctrl-C
                flags = torch.tensor([out_of_time and rank == 0, interruption.requested], dtype=torch.int32,
                                     device=device)
                torch.distributed.all_reduce(flags, torch.distributed.ReduceOp.MAX)
                out_of_time, interrupted = bool(flags[0]), bool(flags[1])
            stopping = out_of_time or interrupted or (args.stop_after and run_steps >= args.stop_after)
            if step % cfg.eval_every == 0 or step == cfg.max_steps or (out_of_time and not interrupted):
                evaluate(rec)
                if layer_errors is not None:
                    rec["layer_errors"] = layer_errors
            if rank == 0:
                if interrupted:
                    rec["stopped"] = "interrupted (Ctrl-C)"
                elif out_of_time:
                    rec["stopped"] = f"--max-minutes {args.max_minutes} reached"
                rec["_t"], rec["_tokens"] = time.time(), run_tokens
                pending.append(rec)
                if step % cfg.log_every == 0 or "heldout_loss" in rec or stopping or step == cfg.max_steps:
                    write_records(pending, log_path, run_start)
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
                    bar.update(len(pending))
                    pending = []
            if step % cfg.save_every == 0 or step == cfg.max_steps or stopping:
                if args.fsdp:  # gathered whole to rank 0, saved like an unsharded run's
                    from .checkpoint import mla_model_from_state_dict
                    from .sharding import gather_full_state

                    model_state, opt_state = gather_full_state(model, opt)
                    if rank == 0:
                        save_checkpoint(mla_model_from_state_dict(start, model_state), tok, opt_state, step, cfg,
                                        last_dir, sharded=True, run_id=run_id)
                elif rank == 0:
                    save_checkpoint(model, tok, opt.state_dict(), step, cfg, last_dir, run_id=run_id)
                saved.update(path=last_dir, step=step)
                if world > 1:
                    torch.distributed.barrier()
            if stopping:
                break
    bar.close()
    if rank == 0 and interrupted:
        print(f"{command_name()}: interrupted at step {step} of {cfg.max_steps}; saved {last_dir}: continue with the "
              "same command plus --resume", file=sys.stderr)
    elif rank == 0 and out_of_time:
        print(f"{command_name()}: stopped at step {step} after {args.max_minutes} minutes; saved {last_dir}: continue "
              "with the same command plus --resume", file=sys.stderr)
    if rank == 0 and step >= cfg.max_steps:
        plot_log(log_path, os.path.join(args.output, "loss_curve.png"))
        print(finished_line(log_path, last_dir, step))
    if world > 1:  # no process leaves while another may still use the group (rank 0 writes the report)
        torch.distributed.barrier()
    return EXIT_INTERRUPTED if interrupted else 0


def finished_line(log_path: str, last_dir: str, step: int) -> str:
    """What a finished run prints: the checkpoint, the last training loss
    and held-out figures of the log, and where the log is."""
    recs = [json.loads(line) for line in open(log_path)]
    parts = [f"checkpoint: {last_dir} (step {step})"]
    train = [r for r in recs if "loss" in r]
    if train:
        parts.append(f"loss {train[-1]['loss']:.4g}")
    held = [r for r in recs if "heldout_loss" in r]
    if held:
        parts.append(f"held-out loss {held[-1]['heldout_loss']:.4g}")
        if "eval_text_ppl" in held[-1]:
            parts.append(f"--eval-text perplexity {held[-1]['eval_text_ppl']:.2f}")
    return "; ".join(parts) + f"; log: {log_path}"


def write_records(pending: list, log_path: str, run_start: float) -> None:
    """Appends the pending step records to the log, their GPU tensors read
    back (this waits for the GPU). The last record's clock is read after
    that wait, so its seconds and tokens/s are exact; earlier records carry
    the time their step was queued, at most a few steps ahead of the GPU."""
    for rec in pending:
        for k, v in rec.items():
            if torch.is_tensor(v):
                rec[k] = v.tolist() if v.dim() else float(v)
    pending[-1]["_t"] = time.time()
    with open(log_path, "a") as f:
        for rec in pending:
            rec["seconds"] = rec.pop("_t") - run_start
            rec["tokens_per_s"] = rec.pop("_tokens") / max(rec["seconds"], 1e-9)
            f.write(json.dumps(rec) + "\n")


def plot_log(log_path: str, out: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    recs = [json.loads(line) for line in open(log_path)]
    fig, ax = plt.subplots(figsize=(6, 4))
    train = [r for r in recs if "loss" in r]
    key, label = ("ce", "train cross-entropy") if train and "ce" in train[0] else ("loss", "attention-transfer error")
    ax.plot([r["tokens"] for r in train], [r[key] for r in train], label=label, lw=0.8)
    held = [r for r in recs if "heldout_loss" in r]
    if held:
        ax.plot([r["tokens"] for r in held], [r["heldout_loss"] for r in held], "o-", label="held-out loss")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
