"""What `train` and `align` need from a distributed engine (DDP, FSDP 1/2, DeepSpeed), through the
engines' own APIs: loram shards nothing itself.

    requested_engine     the engine the launcher asked for (accelerate launch --use_fsdp / --use_deepspeed
                         set ACCELERATE_USE_FSDP / ACCELERATE_USE_DEEPSPEED), read before any load so an
                         unsupported combination fails in one line
    gathered_state_dict  the trained weights, whole, on the CPU. Under FSDP each rank holds only its
                         shards and under ZeRO-3 the parameters are empty placeholders, so rank 0's own
                         ``state_dict()`` is not the model: every rank takes part in the gather, rank 0 writes
    KeepZeros            sparse alignment: pruned zeros stay exactly zero whatever layout the engine gives
                         the parameters (full tensors, DTensor shards, FSDP1 flat views)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import LoramError

# the wrapper modules FSDP1 / activation checkpointing insert into parameter names ("layers.0._fsdp_wrapped_module.mlp...")
_WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def requested_engine() -> str | None:
    """"fsdp" or "deepspeed" when the launcher asked for that engine, else None (single process, DDP)."""
    for engine in ("fsdp", "deepspeed"):
        if os.environ.get(f"ACCELERATE_USE_{engine.upper()}", "false").lower() == "true":
            return engine
    return None


def zero3_cannot_gather() -> bool:
    """ZeRO-3 without 16-bit gathering on save: the trained weights could not be collected at the end
    (accelerate's get_state_dict raises then, after the whole training). Read from accelerate launch's
    flags (--zero_stage, --zero3_save_16bit_model) or its --deepspeed_config_file."""
    file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if file != "none":
        try:
            zero = json.loads(Path(file).read_text()).get("zero_optimization", {})
        except (OSError, ValueError, AttributeError):
            return False  # a missing or bad config file: accelerate reports it itself, before training
        return str(zero.get("stage")) == "3" and str(zero.get("stage3_gather_16bit_weights_on_model_save")).lower() != "true"
    return (os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"
            and os.environ.get("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL", "false").lower() != "true")


def check_engine(command: str, quantize: str | None = None, sparse: bool = False) -> None:
    """Refuse, before anything is loaded, the engine combinations that cannot give a correct result."""
    engine = requested_engine()
    if engine == "deepspeed" and zero3_cannot_gather():
        raise LoramError(f"`loram {command}` under DeepSpeed ZeRO-3 could not collect the trained weights at the end "
                         "(they are partitioned over the ranks): add --zero3_save_16bit_model true to accelerate launch "
                         "(or stage3_gather_16bit_weights_on_model_save: true in the DeepSpeed config)")
    if engine == "fsdp" and quantize == "nf4":
        # bitsandbytes keeps NF4 weights in uint8 storage beside bf16/fp32 parameters; FSDP needs one
        # storage dtype per sharded unit (FSDP-QLoRA sets bnb_4bit_quant_storage to the compute dtype).
        # loram's NF4 loader does not, and nothing here can test FSDP + NF4 (no GPU in CI): refused.
        raise LoramError(f"`loram {command} --quantize nf4` under FSDP is not supported (NF4 weights use uint8 storage, "
                         "which FSDP cannot shard with the other weights): use DDP (torchrun) for QLoRA, "
                         "or FSDP without --quantize")
    if engine == "fsdp" and sparse and os.environ.get("FSDP_VERSION", "1") != "2" \
            and os.environ.get("FSDP_USE_ORIG_PARAMS", "false").lower() != "true":
        # FSDP1 without use_orig_params shows only flat parameters: no weight to take the zeros of
        raise LoramError(f"`loram {command}` of a sparse plan under FSDP1 needs the original parameters: "
                         "use --fsdp_version 2 or --fsdp_use_orig_params true")
    if engine == "deepspeed" and sparse:
        # ZeRO keeps the gradients and the fp32 master weights in its own flat partitions, out of reach of
        # the parameters: masking them would not stop the optimizer from moving the pruned zeros.
        raise LoramError(f"`loram {command}` of a sparse plan under DeepSpeed cannot keep the pruned zeros at zero "
                         "(ZeRO's master weights are out of reach): use FSDP or DDP (torchrun) for sparse alignment")


def gathered_state_dict(trainer, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The trained model's full, unsharded weights on the CPU (``trainable_only``: only requires_grad ones).

    A collective under FSDP / ZeRO-3: call it on EVERY rank. Rank 0 gets every tensor; other ranks may get
    an empty dict (the engines gather to rank 0 only). Single process and DDP: the model's own tensors."""
    model = trainer.model_wrapped
    if trainer.is_fsdp_enabled:  # FSDP1 and FSDP2: torch's distributed-checkpoint API knows both
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
        return retie(trainer.accelerator.unwrap_model(model), get_model_state_dict(model, options=opts))
    if trainer.is_deepspeed_enabled:  # ZeRO-3: consolidated on rank 0 (needs stage3_gather_16bit_weights_on_model_save)
        sd = retie(trainer.accelerator.unwrap_model(model), trainer.accelerator.get_state_dict(model) or {})
    else:
        sd = trainer.accelerator.unwrap_model(model).state_dict()
    if trainable_only:
        keep = {n for n, p in trainer.accelerator.unwrap_model(model).named_parameters() if p.requires_grad}
        sd = {k: v for k, v in sd.items() if k in keep}
    return {k: v.detach().cpu() for k, v in sd.items()}


def retie(model, state: dict) -> dict:
    """``state`` with every tied weight (one parameter under several names: embed_tokens / lm_head) pointing
    at one tensor again. A gather returns separate copies, which the writers would store twice; shared,
    they are written once, as for one process."""
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        name = plain_name(name)
        owner = first.setdefault(id(p), name)
        if owner != name and owner in state and name in state:
            state[name] = state[owner]
    return state


def local_view(t: torch.Tensor) -> torch.Tensor:
    """The part of ``t`` this rank holds, as a plain tensor sharing its storage (an FSDP2 DTensor's local
    shard; anything else as it is: full tensors, FSDP1's flat views)."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def plain_name(name: str) -> str:
    """A parameter's name without the engine's wrapper modules."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name.removeprefix("module.")


def keep_zeros_callback(names):
    """A Trainer callback that keeps the zeros of the weights ``names`` exactly zero.

    The masks are taken when training begins, after the engine wrapped the model, from each rank's own
    part of each weight (zeros are zeros in any layout), so their shapes match what the optimizer sees.
    Every optimizer step: the gradients at the zeros are cleared before it (AdamW then moves nothing
    there: zero gradient, zero moments, decayed zero) and the weights are masked after it (belt and
    braces for optimizers that move a weight without a gradient)."""
    from transformers import TrainerCallback

    class KeepZeros(TrainerCallback):
        masks = ()  # (parameter, mask of its local part), set when training begins

        def on_train_begin(self, args, state, control, model=None, **kw):
            params = {plain_name(n): p for n, p in model.named_parameters()}
            missing = sorted(set(names) - set(params))
            if missing:
                raise LoramError(f"sparse alignment: the engine hides weights {missing[:3]} (FSDP with use_orig_params=False?): "
                                 "use FSDP2 (--fsdp_version 2), FSDP with use_orig_params, or DDP")
            with torch.no_grad():
                self.masks = [(params[n], local_view(params[n]) != 0) for n in names]

        def on_pre_optimizer_step(self, args, state, control, **kw):
            with torch.no_grad():
                for p, m in self.masks:
                    if p.grad is not None:
                        local_view(p.grad).mul_(m)

        def on_optimizer_step(self, args, state, control, **kw):
            with torch.no_grad():
                for p, m in self.masks:
                    local_view(p).mul_(m)

    return KeepZeros()
