"""FSDP for fine-tuning models that do not fit one GPU (finetune.py --fsdp
under torchrun): parameters, gradients and optimizer state sharded across
the processes with FSDP2 (`fully_shard`), one unit per attention block and
per MLP, the rest (embeddings, norms, head) in the root unit.

Attention blocks are units of their own because attention transfer calls
them directly, outside the decoder layer's forward: a unit gathers its
parameters in its own forward. Checkpoints hold the full model and the full
optimizer state (keyed by parameter name), gathered to the CPU of rank 0:
the checkpoint loads like any other, and the optimizer state does not
depend on how it was sharded (resume is tested on the same number of
processes)."""
import torch


def make_mesh(device: torch.device, world: int):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (world,))


def shard_model(model, mesh) -> None:
    """Shards `model` in place over `mesh`; its shards move to the mesh's
    device. Ends with one forward through the root, so that the units know
    their root before attention transfer calls an attention unit directly."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for layer in model.model.layers:
        fully_shard(layer.self_attn, mesh=mesh)
        if hasattr(layer.self_attn, "full_attention"):  # attention transfer's entry point gathers too
            register_fsdp_forward_method(layer.self_attn, "full_attention")
        fully_shard(layer.mlp, mesh=mesh)
    # the root too frees its gathered parameters after each forward (its default keeps them for the backward):
    # the teacher and the evaluations never run one, and the optimizer must see the sharded parameters
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    with torch.no_grad():
        model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=mesh.device_type), use_cache=False)


def _full(cpu_offload: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload)


def gather_full_state(model, opt) -> tuple:
    """(model state dict, optimizer state dict), whole, on rank 0's CPU
    (empty on the other ranks). Every process must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return get_model_state_dict(model, options=_full()), get_optimizer_state_dict(model, opt, options=_full())


def load_full_optimizer_state(model, opt, state: dict) -> None:
    """Scatters a full (name-keyed) optimizer state, as gather_full_state
    saved it, into the sharded optimizer. Every process must call it."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, opt, optim_state_dict=state, options=_full(cpu_offload=False))


def full_tensor(x):
    """A DTensor (e.g. the gradient norm of sharded parameters) as a plain
    tensor; anything else unchanged."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x
