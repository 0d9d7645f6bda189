"""Launches the decode kernel at one benchmark shape, for ncu:
  ncu -k regex:mla_decode -c 1 --section SpeedOfLight --section Occupancy \\
      --section WarpStateStats python3 scripts/profile_decode.py [smollm|llama]"""
import math
import sys

import torch

import mla_cuda  # noqa: F401

shape = sys.argv[1] if len(sys.argv) > 1 else "smollm"
H, n_kv, d_h, R, r = (9, 3, 64, 96, 4) if shape == "smollm" else (32, 32, 128, 2048, 8)
B, L, bs = 64, 4096, 64
D = R + n_kv * 2 * r
cache = torch.randn(B * L // bs, bs, D, device="cuda", dtype=torch.bfloat16)
table = torch.randperm(B * L // bs, device="cuda", dtype=torch.int32).view(B, -1)
lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
q = torch.randn(B, 1, H, R, device="cuda", dtype=torch.bfloat16)
qr = torch.randn(B, 1, H, 2 * r, device="cuda", dtype=torch.bfloat16)
for _ in range(3):
    torch.ops.mla_cuda.mla_attention(q, qr, cache, table, lens, 1 / math.sqrt(d_h), 0)
torch.cuda.synchronize()
