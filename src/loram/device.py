"""Where a command computes (`--device`) and in which precision (`--precision`): one rule for all.

    --device      default: cuda:LOCAL_RANK when CUDA is there, else cpu. Under torchrun/accelerate
                  every process sees LOCAL_RANK; loading to plain "cuda" would put every rank's copy
                  on GPU 0 (N copies there, and FSDP refuses "Inconsistent compute device").
    --precision   auto | bf16 | fp16 | fp32 (compute dtype)
                  auto: bf16 on a GPU that has it (Ampere and later), fp16 before Ampere (training
                  then needs loss scaling), fp32 on the CPU: bf16 *backward* matmuls are 60-150x
                  slower than fp32 on the CPUs we measured (../shared/NOTES.md), so CPUs compute in
                  fp32 and only store in bf16/NF4.
"""

from __future__ import annotations

import os
import re

import torch

from .configs import PRECISIONS, auto_precision
from .errors import LoramError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_DEVICE = re.compile(r"^(cpu|cuda|cuda:\d+|mps)$")


def local_rank() -> int:
    """This process's rank on its machine (torchrun / accelerate set LOCAL_RANK; 0 otherwise)."""
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise LoramError(f"LOCAL_RANK={os.environ['LOCAL_RANK']!r} is not an integer: unset it or launch with torchrun") from None


def default_device() -> torch.device:
    """cuda:LOCAL_RANK when CUDA is available, else the CPU."""
    return torch.device(f"cuda:{local_rank()}") if torch.cuda.is_available() else torch.device("cpu")


def resolve_device(flag: str | None = None) -> torch.device:
    """The device a `--device` value names (None: ``default_device``); one line when it cannot be used."""
    if flag is None or flag == "auto":
        return default_device()
    if not _DEVICE.match(flag):
        raise LoramError(f"--device {flag!r} is not a device: use cpu, cuda, cuda:N or mps")
    if flag.startswith("cuda"):
        if not torch.cuda.is_available():
            raise LoramError(f"--device {flag}: CUDA is not available here (torch {torch.__version__}): use --device cpu "
                             "or install a CUDA build of torch")
        n = torch.cuda.device_count()
        idx = int(flag.split(":")[1]) if ":" in flag else local_rank()
        if idx >= n:
            raise LoramError(f"--device {flag}: this machine has {n} CUDA device(s) (0..{n - 1}): pick one of them")
        return torch.device(f"cuda:{idx}")
    if flag == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise LoramError("--device mps: Apple's MPS backend is not available here: use --device cpu")
    return torch.device(flag)


def resolve_precision(flag: str = "auto", device: torch.device | str = "cpu") -> torch.dtype:
    """The compute dtype for ``--precision flag`` on ``device`` (see the module docstring)."""
    if flag not in PRECISIONS:
        raise LoramError(f"--precision {flag!r}: choose one of {', '.join(PRECISIONS)}")
    device = torch.device(device)
    if flag != "auto":
        if flag == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise LoramError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bf16 (pre-Ampere): "
                             "use --precision fp16 (or auto)")
        return DTYPES[flag]
    return DTYPES[auto_precision(device.type, device.type == "cuda" and torch.cuda.is_bf16_supported())]


def compute_dtype(precision: str | None, device: torch.device | str = "cpu", bf16: bool = False) -> torch.dtype:
    """The dtype a command computes in: ``--precision`` (the old ``--bf16`` switch read as bf16) on ``device``;
    with fp32 on an Ampere+ GPU, matmuls use TF32 (``enable_tf32``)."""
    from .settings import precision_of

    dtype = resolve_precision(precision_of(precision, bf16), device)
    enable_tf32(dtype, device)
    return dtype


def tf32_capable(device: torch.device | str) -> bool:
    """TF32 tensor cores: CUDA compute capability 8.0 (Ampere) and later."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


def enable_tf32(dtype: torch.dtype, device: torch.device | str) -> bool:
    """fp32 on an Ampere+ GPU: let matmuls and convolutions use TF32 (10-bit mantissa inputs, fp32
    accumulation: ~8x the fp32 throughput, ample for training); off the GPU nothing changes."""
    if dtype != torch.float32 or not tf32_capable(device):
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True


def trainer_precision(dtype: torch.dtype, device: torch.device | str) -> dict:
    """The TrainingArguments precision flags for compute ``dtype``: bf16 -> bf16 autocast; fp16 -> fp16
    autocast with the Trainer's dynamic loss scaling (fp16's range underflows small gradients without
    it), CUDA only; fp32 -> neither (TF32 is switched on by ``enable_tf32``)."""
    device = torch.device(device)
    if dtype == torch.float16 and device.type != "cuda":
        raise LoramError("--precision fp16 trains with loss scaling, which needs a CUDA GPU: use --precision fp32 on "
                         f"{device.type} (or bf16)")
    return {"bf16": dtype == torch.bfloat16, "fp16": dtype == torch.float16}
