"""NF4 (QLoRAM): bitsandbytes 4-bit NormalFloat + double quant on the decoder linears.

    require_bnb()          import bitsandbytes (install hint if absent) and check, once per process,
                           that it quantises correctly here: bitsandbytes 0.49/0.50 quantise wrongly
                           on CPU under torch 2.13, which a round trip of a Gaussian shows at once
    nf4_linear(w, b)       one Linear4bit quantised from a float weight, where the weight is (GPU or CPU)
    quantize_nf4(model)    every decoder-layer linear, one at a time
    nf4_stream_transform   LayerStream transform of an NF4 load: the linears' weights come in fp32 (what
                           the quantiser reads), everything else in the compute dtype, so a layer-by-layer
                           load on the device (loading._load_nf4) holds one layer of fp32 at a time and
                           stores embeddings, lm_head and norms in the compute dtype (not fp32)
    store_rest_in(model)   the same for a model quantised whole: its non-NF4 parameters to the compute dtype
    random_nf4_linear      a Linear4bit drawn directly as random NF4 codes and block scales (build's
                           random weights: same tensors, dtypes and kernels as a quantised checkpoint,
                           without running the slow CPU quantiser on values that do not matter)

bitsandbytes is imported only here and only when NF4 is asked for.
"""

from __future__ import annotations

import functools
import re
import warnings

import torch
from torch import nn

from .errors import LoramError
from .families import decoder_layers

QUANTIZED_MARK = "loram_quantized"  # model attribute: "nf4" once its decoder linears are quantised
NF4_BLOCK = 64
# the tensors quantize_block_nf4 turns into NF4: the weights of a decoder layer's attention / MLP linears
QUANTISED_WEIGHT = re.compile(r"\.(self_attn|mlp)\.[^.]+_proj\.weight$")
ABSMAX_SIGMAS = 2.5  # E[max |x|] over 64 N(0, s^2) draws ~ 2.4 s
# relative error of an NF4 round trip of a Gaussian: ~0.09 when bitsandbytes works
ROUND_TRIP_OK = 0.15


def require_bnb():
    """bitsandbytes, imported and checked (see module doc); one line naming the fix otherwise."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise LoramError("--quantize nf4 needs bitsandbytes: pip install 'loram[nf4]' (or pip install bitsandbytes)") from None
    check_round_trip(bnb.__version__)
    return bnb


@functools.cache
def check_round_trip(version: str) -> None:
    """Refuse a bitsandbytes whose NF4 round trip is off; runs once per process (a failure is not cached)."""
    err = round_trip_error()
    if not err <= ROUND_TRIP_OK:
        raise LoramError(f"bitsandbytes {version} quantises NF4 wrongly here (a 64x64 Gaussian comes back with "
                         f"{err:.0%} relative error, expected ~9%): pip install 'bitsandbytes<0.49'")


def round_trip_error() -> float:
    """||dequant(quant(W)) - W|| / ||W|| for a fixed 64x64 N(0, 1) W, NF4 with double quant, on CPU."""
    import bitsandbytes.functional as F

    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # bitsandbytes' own deprecation noise
        q, state = F.quantize_4bit(w, blocksize=NF4_BLOCK, quant_type="nf4", compress_statistics=True)
        back = F.dequantize_4bit(q, state).float()
    return float((back - w).norm() / w.norm())


QUANT_CHUNK = 1 << 20  # elements quantised at once (a few bytes of temporaries each)


def nf4_table(device="cpu") -> torch.Tensor:
    """The 16 NF4 code values, ascending (bitsandbytes' table: code i is the value of 4-bit code i)."""
    import bitsandbytes.functional as F

    return F.get_4bit_type("nf4", device=device).float()


def quantize_block_codes(x: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed codes uint8 [n/2], fp32 absmax per 64-block) of a flat chunk of whole blocks (a partial
    block only at the very end): bitsandbytes' NF4 quantiser, value for value, without its [n, 16] table.

    bitsandbytes (backends/default) scales each block by 1/absmax, clamps to [-1, 1] and takes
    argmin_i |s - code_i| over the 16 codes: 128 bytes of temporaries per weight, ~9 GB for one
    13824 x 5120 LLaMA-2-13B MLP linear, and slow. The codes are sorted, and fl(s - c) is monotone in c,
    so the minimum is one of the two codes around s (torch.bucketize): compare those two distances,
    computed as bitsandbytes computes them, the lower index winning a tie as argmin's first minimum
    does. A block of zeros scales to NaN there (0 * inf), which argmin reads as code 0: kept."""
    n = x.numel()
    rem = n % NF4_BLOCK
    full = x[: n - rem].reshape(-1, NF4_BLOCK).float()
    absmax = full.abs().max(dim=-1)[0]
    scaled = torch.clamp(full * (1 / absmax.view(-1, 1)), -1, 1).reshape(-1)
    if rem:
        tail = x[n - rem:].float()
        amax = tail.abs().max()
        absmax = torch.cat([absmax, amax.view(1)])
        scaled = torch.cat([scaled, torch.clamp(tail * (1 / amax), -1, 1)])
    hi = torch.bucketize(scaled, table).clamp_(0, 15)
    lo = (hi - 1).clamp_(0, 15)
    take_lo = (scaled - table[lo]).abs() <= (scaled - table[hi]).abs()
    q = torch.where(take_lo, lo, hi)
    q[scaled.isnan()] = 0
    q = q.to(torch.uint8)
    return q[::2] << 4 | q[1::2], absmax


def quantize_codes(weight: torch.Tensor, chunk: int = QUANT_CHUNK):
    """(packed NF4 codes [n/2, 1] uint8, QuantState with double quant): the bytes bitsandbytes'
    ``quantize_4bit(weight, 64, compress_statistics=True, quant_type="nf4")`` gives (tests compare them).

    In chunks of whole blocks (NF4 blocks are independent: 64 consecutive values, one absmax each) with
    ``quantize_block_codes``; the double quant of the absmax runs over the whole tensor, as bitsandbytes
    does it. Runs on ``weight``'s device; each chunk is converted to fp32 on its own, so no fp32 copy of
    the weight exists. bitsandbytes itself needs an even number of weights; so does this."""
    flat = weight.detach().reshape(-1)
    n = flat.numel()
    chunk = max(NF4_BLOCK, chunk - chunk % NF4_BLOCK)
    table = nf4_table(flat.device)
    codes, absmax = [], []
    for a in range(0, n, chunk):
        c, m = quantize_block_codes(flat[a:a + chunk], table)
        codes.append(c)
        absmax.append(m)
    return torch.cat(codes).unsqueeze(1), double_quant(torch.cat(absmax), weight.shape)


def double_quant(absmax: torch.Tensor, shape) -> object:
    """The QuantState of NF4 blocks with fp32 ``absmax``, the absmax themselves quantised (8-bit blocks
    of 256 around their mean) exactly as bitsandbytes' ``compress_statistics=True`` does."""
    import bitsandbytes.functional as F

    offset = absmax.mean()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        qabsmax, state2 = F.quantize_blockwise(absmax - offset, blocksize=256)
    return F.QuantState(absmax=qabsmax, shape=torch.Size(shape), dtype=torch.float32, blocksize=NF4_BLOCK,
                        code=F.get_4bit_type("nf4", device=absmax.device), quant_type="nf4", offset=offset, state2=state2)


def linear4bit(codes: torch.Tensor, qs, bias: torch.Tensor | None, compute_dtype) -> nn.Module:
    """A Linear4bit around already packed NF4 ``codes`` and their QuantState (nothing is quantised here)."""
    bnb = require_bnb()
    out_f, in_f = qs.shape
    with torch.device("meta"):  # no full-size init: the weight is set below
        q = bnb.nn.Linear4bit(in_f, out_f, bias=bias is not None, compute_dtype=compute_dtype, compress_statistics=True,
                              quant_type="nf4")
    q.weight = bnb.nn.Params4bit(codes, requires_grad=False, quant_state=qs, blocksize=NF4_BLOCK, compress_statistics=True,
                                 quant_type="nf4", quant_storage=torch.uint8, module=q, bnb_quantized=True)
    if bias is not None:
        q.bias = nn.Parameter(bias.to(compute_dtype), requires_grad=False)
    return q


def nf4_linear(weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype=torch.bfloat16, device=None) -> nn.Module:
    """A bitsandbytes NF4 (+ double quant) Linear4bit holding ``weight`` [out, in], quantised where
    ``weight`` is (``device``: where the module goes; default: there too)."""
    require_bnb()
    q = linear4bit(*quantize_codes(weight), bias, compute_dtype)
    return q.to(device) if device is not None else q


def quantize_block_nf4(block, compute_dtype=torch.bfloat16, skip=("lm_head",), device=None) -> None:
    """Replace the nn.Linear modules of one decoder layer by NF4 Linear4bit, one at a time, quantised on
    ``device`` (default: where each weight is): one linear's weight travels there, not the model."""
    for parent_name in ("self_attn", "mlp"):
        parent = getattr(block, parent_name)
        for name, lin in list(parent.named_children()):
            if not isinstance(lin, nn.Linear) or name in skip:
                continue
            w, b = lin.weight.data, None if lin.bias is None else lin.bias.data
            if device is not None:
                w, b = w.to(device), None if b is None else b.to(device)
            setattr(parent, name, nf4_linear(w, b, compute_dtype))
            del w, b


def quantize_nf4(model, compute_dtype=torch.bfloat16, skip=("lm_head",), device=None) -> nn.Module:
    """Replace every decoder-layer nn.Linear by a bitsandbytes NF4 (+ double quant) Linear4bit, quantised
    on ``device`` (default: where the weights are; the modules stay there)."""
    require_bnb()
    for block in decoder_layers(model):
        quantize_block_nf4(block, compute_dtype, skip, device)
    setattr(model, QUANTIZED_MARK, "nf4")
    return model


def nf4_stream_transform(compute_dtype):
    """A LayerStream ``transform``: the linears that will be quantised keep fp32 (the quantiser's input:
    the same NF4 bytes as quantising the fp32 model), every other tensor is stored in the compute dtype."""
    def transform(name: str, t: torch.Tensor) -> torch.Tensor:
        return t if QUANTISED_WEIGHT.search(name) or not t.is_floating_point() else t.to(compute_dtype)

    return transform


def store_rest_in(model, compute_dtype) -> nn.Module:
    """The parameters NF4 left as floats (embeddings, lm_head, norms) in ``compute_dtype``: an fp32 lm_head
    beside bf16 compute is twice the bytes and a cast every step. Buffers (rotary inv_freq) stay fp32."""
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != compute_dtype:
            p.data = p.data.to(compute_dtype)
    return model


def random_nf4_linear(shape: tuple, bias: bool, compute_dtype, std: float, gen: torch.Generator) -> nn.Module:
    """A Linear4bit [out, in] with random NF4 codes and block absmax ~ ABSMAX_SIGMAS * std (the expected
    max of 64 Gaussians), double-quantised by bitsandbytes exactly as its quantiser does."""
    require_bnb()
    out_f, in_f = shape
    n = out_f * in_f
    n_bytes = (n + 1) // 2
    # random bytes = two random 4-bit codes each; drawn as int64 for speed (8 bytes per draw) and
    # kept as a uint8 view of that buffer: a copy would free a layer-sized temporary per linear
    codes = torch.empty(-(-n_bytes // 8), dtype=torch.int64).random_(generator=gen).view(torch.uint8)
    codes = codes[:n_bytes].unsqueeze(1)
    blocks = -(-n // NF4_BLOCK)
    absmax = torch.empty(blocks, dtype=torch.float32).normal_(ABSMAX_SIGMAS * std, 0.3 * std, generator=gen).abs_()
    return linear4bit(codes, double_quant(absmax, shape), torch.zeros(out_f) if bias else None, compute_dtype)
