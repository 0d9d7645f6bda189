"""Command line of fine-tuning (python/finetune.py). One process, or several
through torchrun (DDP; NCCL on GPUs, gloo on CPU), with the same script."""
import argparse
import dataclasses
import json
import os
import sys
import time

import torch

from .results import pyplot
from .training import (PackedData, TrainConfig, heldout_loss, load_state, loss_fn, lr_at, param_groups,
                       save_checkpoint, tokenize_corpus)


def build_parser():
    p = argparse.ArgumentParser(
        prog="finetune.py",
        description="Fine-tune a converted (MLA) checkpoint to recover quality: cross-entropy and optional KL "
        "distillation from the original model; resumable; DDP through torchrun.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
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
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "betas":
            continue
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default, help=f.name.replace("_", " "))
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .calibration import default_corpus
    from .checkpoint import CheckpointError, load_mla_model

    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if f.name != "betas"})
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if args.device == "auto":
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if world > 1:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    last = os.path.join(args.output, "last")
    start = args.checkpoint
    state = None
    if args.resume and os.path.isdir(last):
        start, state = last, load_state(last)
    try:
        model = load_mla_model(start, torch.float32, device)
    except CheckpointError as e:
        print(f"finetune.py: {e}", file=sys.stderr)
        return 2
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
    if cfg.distill_weight > 0:
        if not args.teacher:
            print("finetune.py: --distill-weight needs --teacher", file=sys.stderr)
            return 2
        from .source import load_source

        teacher = load_source(None if args.teacher == "default" else args.teacher, torch.float32, device,
                              with_tokenizer=False)[0].eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    groups = param_groups(model, cfg)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=device.type == "cuda")
    step = 0
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        step = int(state["step"])
        torch.set_rng_state(state["rng"])
    train_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    model.train()
    os.makedirs(args.output, exist_ok=True)
    log_path = os.path.join(args.output, "log.jsonl")
    if rank == 0:  # what this run is, for reports and for repeating it
        with open(os.path.join(args.output, "run.json"), "w") as f:
            json.dump(dict(checkpoint=args.checkpoint, data=paths, teacher=args.teacher, world_size=world,
                           config=dataclasses.asdict(cfg)), f, indent=1)
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.max_steps, initial=step, desc="fine-tune", disable=args.quiet or rank != 0)
    seqs_per_step = cfg.batch_size * cfg.grad_accum * world
    if step == 0 and rank == 0:  # the converted model before any training: the start of the quality curve
        with open(log_path, "a") as f:
            f.write(json.dumps(dict(step=0, tokens=0, heldout_loss=heldout_loss(model, data, cfg, device))) + "\n")
    run_steps = 0
    t_last, tokens_done = time.time(), 0
    out_of_time = False
    while step < cfg.max_steps:
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)
        total = ce_total = 0.0
        for micro in range(cfg.grad_accum):
            pos = step * seqs_per_step + (micro * world + rank) * cfg.batch_size
            batch = data.train_batch(pos, cfg.batch_size).to(device)
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                logits = train_model(input_ids=batch[:, :-1], use_cache=False).logits
                t_logits = teacher(input_ids=batch[:, :-1], use_cache=False).logits if teacher is not None else None
            loss, ce = loss_fn(logits, batch[:, 1:], t_logits, cfg)
            (loss / cfg.grad_accum).backward()
            total += float(loss.detach()) / cfg.grad_accum
            ce_total += float(ce.detach()) / cfg.grad_accum
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip))
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        run_steps += 1
        tokens_done += seqs_per_step * cfg.seq_len
        rec = dict(step=step, loss=total, ce=ce_total, lr=lr, grad_norm=grad_norm, tokens=step * seqs_per_step * cfg.seq_len)
        if args.max_minutes:  # one decision for all processes (rank 0's clock)
            flag = torch.tensor([time.time() - t_last > 60 * args.max_minutes], dtype=torch.int32, device=device)
            if world > 1:
                torch.distributed.broadcast(flag, 0)
            out_of_time = bool(flag.item())
        stopping = out_of_time or (args.stop_after and run_steps >= args.stop_after)
        if step % cfg.eval_every == 0 or step == cfg.max_steps or out_of_time:
            rec["heldout_loss"] = heldout_loss(model, data, cfg, device)
        if rank == 0:
            now = time.time()
            rec["tokens_per_s"] = tokens_done / max(now - t_last, 1e-9)
            rec["seconds"] = now - t_last
            if out_of_time:
                rec["stopped"] = f"--max-minutes {args.max_minutes} reached"
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            bar.set_postfix(loss=f"{total:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
            bar.update(1)
        if step % cfg.save_every == 0 or step == cfg.max_steps or stopping:
            if rank == 0:
                save_checkpoint(model, tok, opt, step, cfg, last)
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


def plot_log(log_path: str, out: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    recs = [json.loads(line) for line in open(log_path)]
    fig, ax = plt.subplots(figsize=(6, 4))
    train = [r for r in recs if "ce" in r]
    ax.plot([r["tokens"] for r in train], [r["ce"] for r in train], label="train cross-entropy", lw=0.8)
    held = [r for r in recs if "heldout_loss" in r]
    if held:
        ax.plot([r["tokens"] for r in held], [r["heldout_loss"] for r in held], "o-", label="held-out loss")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
