"""Command line of fine-tuning (python/finetune.py). One process, or several
through torchrun (DDP; NCCL on GPUs, gloo on CPU), with the same script."""
import argparse
import dataclasses
import json
import math
import os
import sys
import time

import torch

from .attention_transfer import TeacherAttentionTaps, attention_transfer_loss
from .results import pyplot
from .sharding import full_tensor
from .training import (OBJECTIVES, TRAIN_SCOPES, PackedData, TrainConfig, heldout_loss, load_state, loss_fn, lr_at,
                       param_groups, save_checkpoint, text_sequences, tokenize_corpus)


CHOICES = dict(objective=OBJECTIVES, train=TRAIN_SCOPES)
HELP = dict(
    objective="lm: next-token cross-entropy and/or KL to --teacher (--distill-weight); attention: attention "
    "transfer, each layer's attention output matched to the teacher's from the teacher's own layer input "
    "(trains attention weights only; a first stage, run lm after it from its checkpoint)",
    train="which parameters train under --objective lm: all, or attention projections and norms only",
    distill_weight="0 = cross-entropy only, 1 = KL to the teacher's logits only, between = a mix",
    new_proj_lr_mult="lr multiplier of the projections the conversion created (kv_down, k_up, v_up, "
    "k_rope_proj, q_rope_map)",
    log_every="steps between writes of the log (reading losses back waits for the GPU)",
)


class DefaultsWhereMeaningful(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None and those the help text already names."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser():
    p = argparse.ArgumentParser(
        prog="finetune.py",
        description="Fine-tune a converted (MLA) checkpoint to recover quality: cross-entropy and optional KL "
        "distillation from the original model; resumable; DDP through torchrun.",
        formatter_class=DefaultsWhereMeaningful,
    )
    p.add_argument("checkpoint", help="converted checkpoint directory (python/convert.py output)")
    p.add_argument("--output", required=True, help="where checkpoints, log.jsonl and the loss curve go")
    p.add_argument("--data", nargs="+", default=None,
                   help="text files, folders, jsonl or pre-tokenized .npy (default: ../shared/data/corpus)")
    p.add_argument("--cache-dir", default=None, help="token cache (default: <output>/token_cache)")
    p.add_argument("--teacher", default=None, help="original model for distillation (HF dir / hub id / .gguf; "
                   "'default' = SmolLM2-135M-Instruct); needed when --distill-weight > 0")
    p.add_argument("--resume", action="store_true", help="continue from <output>/last if it exists")
    p.add_argument("--stop-after", type=int, default=0, help="stop (as if interrupted) after this many steps of this run")
    p.add_argument("--max-minutes", type=float, default=0.0,
                   help="stop this run after so many minutes of training, saving a resumable checkpoint (the "
                   "schedule is still that of --max-steps: set both so the decay is reached); 0 = no limit")
    p.add_argument("--eval-text", default=None,
                   help="a text file or pre-tokenized .npy (e.g. WikiText-2 valid) whose loss and perplexity, "
                   "over packed sequences of --seq-len tokens, are logged at every held-out evaluation: quality "
                   "against tokens on text outside the training corpus")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (under torchrun: the local rank's GPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun, shard parameters, gradients and optimizer state across the processes "
                   "(FSDP2: one unit per attention block and per MLP) instead of replicating them (DDP): for "
                   "models that do not fit one GPU; checkpoints still hold the whole model")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "betas":
            continue
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                       choices=CHOICES.get(f.name), help=HELP.get(f.name, f.name.replace("_", " ")))
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .calibration import default_corpus
    from .checkpoint import CheckpointError, load_mla_model

    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if f.name != "betas"})
    needs_teacher = cfg.distill_weight > 0 or cfg.objective == "attention"
    if needs_teacher and not args.teacher:
        print("finetune.py: --distill-weight > 0 and --objective attention need --teacher (the original model)",
              file=sys.stderr)
        return 2
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if args.fsdp and world < 2:
        print("finetune.py: --fsdp shards the model across processes: start it with torchrun --nproc-per-node N, "
              "N >= 2", file=sys.stderr)
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
    last = os.path.join(args.output, "last")
    start = args.checkpoint
    state = None
    if args.resume and os.path.isdir(last):
        start, state = last, load_state(last)
        if state is not None and bool(state.get("sharded")) != args.fsdp:
            print(f"finetune.py: {last} was saved {'with' if state.get('sharded') else 'without'} --fsdp: resume it "
                  "the same way", file=sys.stderr)
            return 2
    # a sharded model is loaded on the CPU; each process moves only its shards to its GPU
    load_device = torch.device("cpu") if args.fsdp else device
    try:
        model = load_mla_model(start, torch.float32, load_device)
    except CheckpointError as e:
        print(f"finetune.py: {e}", file=sys.stderr)
        return 2
    mesh = None
    if args.fsdp:
        from .sharding import make_mesh, shard_model

        mesh = make_mesh(device, world)
        shard_model(model, mesh)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.checkpoint) if os.path.exists(os.path.join(args.checkpoint, "tokenizer_config.json")) else None
    paths = args.data or [default_corpus()]
    if tok is None and any(not p.endswith(".npy") for p in paths):
        print("finetune.py: the checkpoint has no tokenizer; give pre-tokenized .npy data", file=sys.stderr)
        return 2
    cache_dir = args.cache_dir or os.path.join(args.output, "token_cache")
    if rank == 0:
        tokens = tokenize_corpus(paths, tok, cache_dir, not args.quiet)
    if world > 1:
        torch.distributed.barrier()
    tokens = tokenize_corpus(paths, tok, cache_dir, False)
    data = PackedData(tokens, cfg.seq_len, seed=cfg.seed)
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
    eval_text = None
    if args.eval_text:
        if tok is None and not args.eval_text.endswith(".npy"):
            print("finetune.py: the checkpoint has no tokenizer; give --eval-text as pre-tokenized .npy", file=sys.stderr)
            return 2
        eval_text = text_sequences(args.eval_text, tok, cache_dir, cfg.seq_len)
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
    os.makedirs(args.output, exist_ok=True)
    log_path = os.path.join(args.output, "log.jsonl")
    if rank == 0:  # what this run is, for reports and for repeating it
        with open(os.path.join(args.output, "run.json"), "w") as f:
            json.dump(dict(checkpoint=args.checkpoint, data=paths, teacher=args.teacher, world_size=world,
                           fsdp=args.fsdp, eval_text=args.eval_text, config=dataclasses.asdict(cfg)), f, indent=1)
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.max_steps, initial=step, desc="fine-tune", disable=args.quiet or rank != 0)
    seqs_per_step = cfg.batch_size * cfg.grad_accum * world

    def evaluate(rec: dict) -> dict:
        rec["heldout_loss"] = heldout_loss(model, data, cfg, device)
        if eval_text is not None:
            rec["eval_text_loss"] = heldout_loss(model, eval_text, cfg, device, max_batches=0)
            rec["eval_text_ppl"] = math.exp(rec["eval_text_loss"])
        return rec

    if step == 0:  # the converted model before any training: the start of the quality curve
        first = evaluate(dict(step=0, tokens=0))  # every process: a sharded model's forward is collective
        if rank == 0:
            with open(log_path, "a") as f:
                f.write(json.dumps(first) + "\n")
    pending = []  # records whose losses are still GPU tensors: read back every log_every steps, not every step
    run_steps = 0
    t_last, tokens_done = time.time(), 0
    out_of_time = False
    while step < cfg.max_steps:
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)
        total = ce_total = 0.0
        layer_errors = None
        for micro in range(cfg.grad_accum):
            pos = step * seqs_per_step + (micro * world + rank) * cfg.batch_size
            batch = data.train_batch(pos, cfg.batch_size)
            batch = batch.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else batch
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                if taps is not None:
                    loss, errors = attention_transfer_loss(model, teacher, taps, batch[:, :-1])
                    layer_errors = errors / cfg.grad_accum + (0 if layer_errors is None else layer_errors)
                else:
                    logits = train_model(input_ids=batch[:, :-1], use_cache=False).logits
                    t_logits = teacher(input_ids=batch[:, :-1], use_cache=False).logits if teacher is not None else None
            if taps is None:
                loss, ce = loss_fn(logits, batch[:, 1:], t_logits, cfg)
                ce_total = ce_total + ce.detach() / cfg.grad_accum
            (loss / cfg.grad_accum).backward()
            total = total + loss.detach() / cfg.grad_accum
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
        tokens_done += seqs_per_step * cfg.seq_len
        rec = dict(step=step, loss=total, lr=lr, grad_norm=grad_norm, tokens=step * seqs_per_step * cfg.seq_len)
        if taps is None:
            rec["ce"] = ce_total
        if args.max_minutes:  # one decision for all processes (rank 0's clock)
            out_of_time = time.time() - t_last > 60 * args.max_minutes
            if world > 1:
                flag = torch.tensor([out_of_time], dtype=torch.int32, device=device)
                torch.distributed.broadcast(flag, 0)
                out_of_time = bool(flag.item())
        stopping = out_of_time or (args.stop_after and run_steps >= args.stop_after)
        if step % cfg.eval_every == 0 or step == cfg.max_steps or out_of_time:
            evaluate(rec)
            if layer_errors is not None:
                rec["layer_errors"] = layer_errors
        if rank == 0:
            if out_of_time:
                rec["stopped"] = f"--max-minutes {args.max_minutes} reached"
            rec["_t"], rec["_tokens"] = time.time(), tokens_done
            pending.append(rec)
            if step % cfg.log_every == 0 or "heldout_loss" in rec or stopping or step == cfg.max_steps:
                write_records(pending, log_path, t_last)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
                bar.update(len(pending))
                pending = []
        if step % cfg.save_every == 0 or step == cfg.max_steps or stopping:
            if args.fsdp:  # gathered whole to rank 0, saved like an unsharded run's
                from .checkpoint import mla_model_from_state_dict
                from .sharding import gather_full_state

                model_state, opt_state = gather_full_state(model, opt)
                if rank == 0:
                    save_checkpoint(mla_model_from_state_dict(start, model_state), tok, opt_state, step, cfg, last,
                                    sharded=True)
            elif rank == 0:
                save_checkpoint(model, tok, opt.state_dict(), step, cfg, last)
            if world > 1:
                torch.distributed.barrier()
        if stopping:
            if out_of_time and rank == 0:
                print(f"finetune.py: stopped at step {step} after {args.max_minutes} minutes; "
                      f"continue with --resume", file=sys.stderr)
            break
    bar.close()
    if rank == 0 and step >= cfg.max_steps:
        plot_log(log_path, os.path.join(args.output, "loss_curve.png"))
    if world > 1:
        torch.distributed.destroy_process_group()
    return 0


def write_records(pending: list, log_path: str, t_start: float) -> None:
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
            rec["seconds"] = rec.pop("_t") - t_start
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
