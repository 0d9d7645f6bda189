"""Attention transfer: the first stage of fine-tuning a converted model.

Every converted attention layer learns, on its own, to reproduce the original
model's attention output from the original model's input to that layer. One
teacher forward gives all layers' inputs and targets, and the layers train
side by side; nothing but attention weights changes, so the MLPs, embeddings
and norms stay exactly the original's. Each layer gets a dense target
(hidden_size numbers per token instead of one next token) and no layer's
error feeds the next, which is why this stage recovers most of what the
conversion lost from few tokens. The end-to-end stage (cross-entropy or KL to
the teacher's logits) then fixes what the layers' errors add up to.

The idea is LoLCATs' attention transfer (Zhang et al., 2024), applied to the
MLA attention of docs/method.md.
"""
from typing import Tuple

import torch

from .modeling import mla_layers


class TeacherAttentionTaps:
    """Forward hooks on the teacher's attention modules that keep, for the
    last forward, each layer's input hidden states and attention output."""

    def __init__(self, teacher):
        self.inputs: dict = {}
        self.outputs: dict = {}
        self._handles = [layer.self_attn.register_forward_hook(self._keep(i), with_kwargs=True)
                         for i, layer in enumerate(teacher.model.layers)]

    def _keep(self, i: int):
        def hook(module, args, kwargs, output):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            self.inputs[i] = x.detach()
            self.outputs[i] = (output[0] if isinstance(output, tuple) else output).detach()
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def attention_transfer_loss(student, teacher, taps: TeacherAttentionTaps,
                            input_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean over layers of each layer's relative squared error
    |student_attn(x) - teacher_attn(x)|^2 / |teacher_attn(x)|^2, x the
    teacher's input to that layer; input_ids [batch, seq]. Returns (loss,
    the per-layer errors [layers] as a detached tensor)."""
    with torch.no_grad():
        # the LM head is not needed: logits of one position only (through the root forward, which a
        # sharded teacher needs to gather its embeddings)
        teacher(input_ids=input_ids, use_cache=False, logits_to_keep=1)
    batch, seq = input_ids.shape
    positions = torch.arange(seq, device=input_ids.device).expand(batch, seq)
    errors = []
    for i, attn in enumerate(mla_layers(student)):
        teacher_out = taps.outputs[i].float()
        student_out = attn.full_attention(taps.inputs[i], positions, None).float()
        errors.append((student_out - teacher_out).pow(2).mean() / teacher_out.pow(2).mean().clamp_min(1e-12))
    errors = torch.stack(errors)
    return errors.mean(), errors.detach()
