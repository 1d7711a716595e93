"""A frozen base larger than one device: its decoder layers sharded across the processes (`--shard fsdp`).

Each decoder layer becomes an FSDP2 unit (torch's `fully_shard`, the call accelerate's FSDP2 plugin
makes): every process holds 1/N of each layer's weights, gathers a layer's full weights just
before running it, forward and backward, and frees them after. What trains (the soft prompt, a
prefix's keys and values, a P-tuning or residual encoder) is not sharded: it is replicated and its
gradient all-reduced by the data-parallel wrapper (Method.distribute), so N processes train what
one process would with the combined batch.

Two choices differ from `accelerate launch --use_fsdp`:
- the processes and their process group are accelerate's, but the sharding call is made here:
  accelerate turns its FSDP plugin on for GPU-type processes only (accelerate/state.py keeps CPU
  processes as MULTI_CPU), and the same code must run in the tests on CPU (gloo);
- the embeddings, the final norm and the LM head stay whole on every process: softprompt reads
  them outside the model's own forward (the prompt's initialisation, the frozen-head loss), where
  FSDP would hand it a shard. On an 8B Llama they are 1B of its 8B weights.
"""
from __future__ import annotations

from ..core.utils import SoftpromptError
from .families import decoder_layers


def shard_decoder(model, processes: int) -> None:
    """Shard each decoder layer across the processes of the default process group."""
    from torch.distributed.fsdp import fully_shard

    if processes < 2:
        raise SoftpromptError("--shard fsdp needs several processes: start them with accelerate launch or torchrun "
                              "(e.g. torchrun --nproc_per_node 2 -m softprompt train ...)")
    if getattr(model, "hf_quantizer", None) is not None:
        raise SoftpromptError("--shard fsdp cannot shard a --quantize base (its 8/4-bit weights are not plain tensors)")
    layers = decoder_layers(model)
    if not layers:
        raise SoftpromptError(f"--shard fsdp: no decoder layers found in {model.config.model_type}")
    for layer in layers:
        fully_shard(layer)


def local_bytes(model) -> int:
    """Bytes of the base's weights this process holds (a sharded layer's local shard only)."""
    total = 0
    for p in model.parameters():
        t = p.to_local() if hasattr(p, "to_local") else p
        total += t.numel() * t.element_size()
    return total
