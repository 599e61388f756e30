"""`loram prune --compensate`: least-squares update of the kept input columns of o_proj / down_proj.

Structured pruning drops rows of q/k/v/gate/up and the matching input columns of o_proj / down_proj.
For such a projection W [out, in] with calibration inputs X [tokens, in] (collected on the ORIGINAL
model from the original inputs) and kept columns K, the plain slice W[:, K] loses the contribution
of the dropped inputs. The kept columns are refitted so that the pruned projection reproduces the
original's output on X (the structured analogue of SparseGPT's update; SlimGPT, FLAP):

    W'_K = argmin ||X W^T - X_K W'^T||^2 + lambda ||W' - W[:, K]||^2
         = (W G[:, K] + lambda W[:, K]) (G[K, K] + lambda I)^-1,      G = X^T X   [in, in]

lambda = DAMP x mean(diag G[K, K]), DAMP = 1 (SparseGPT's relative dampening is 0.01, but it sees ~260 k
calibration tokens; loram's default calibration is the 773-token built-in text, fewer tokens than
down_proj has inputs, so the fit is underdetermined and 0.01 overfits it: SmolLM2-135M, taylor 0.3,
perplexity of the pruned model on data/general_text.txt: slice 91.9, DAMP 0.01 126.8, 0.1 88.4, 1 77.7,
10 76.9; chosen on that text, so these are dev-split figures). The ridge pulls towards the plain
slice rather than towards zero, so the calibration error is never above the plain slice's (W[:, K]
is feasible with zero penalty) and the weights stay the slice where the data says nothing. Solved
in float64 (G[K, K] of a dead input is 0: the dampening keeps the system positive definite).

Rows of q/k/v/gate/up are dropped as before; only o/down change. The update is computed before
apply_plan shrinks the modules, so one forward of the original model per chunk of layers gives every
Gram of the chunk (hooks on the o/down inputs); chunks keep the Grams under ``GRAM_BYTES``.

Streamed (``streamed_refits``): the original decoder layers are read one at a time (loram.stream),
each run over the captured inputs with hooks collecting its two Grams; the refit of layer i is handed to
the writer (build.write_pruned) as it writes layer i, so one layer's Grams and weights are resident.
"""

from __future__ import annotations

import torch

from ..errors import LoramError
from ..families import COL_PRUNED, MODULE_OF_ROLE, geometry, layer_module
from ..progress import track
from ..prune_plan import PrunePlan
from .sparsegpt import Hessian
from .structured import CALIBRATED, calibration_batches, input_stats

DAMP = 1.0  # ridge weight relative to mean(diag G[K, K]): see the module docstring
GRAM_BYTES = 2 << 30  # fp32 Grams held at once (a 70B's down_proj Gram alone is 3.3 GB: then one per pass)


def compensated_columns(weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """The refitted kept columns W'_K [out, |K|] (float32) of ``weight`` [out, in] given the input Gram
    ``gram`` = X^T X [in, in]; ``damp`` = 0 gives the plain least-squares optimum (G[K, K] must then be invertible)."""
    W, G = weight.detach().double(), gram.double()
    keep = keep.to(G.device)
    WK = W[:, keep]
    GKK = G[keep][:, keep]
    lam = damp * torch.diagonal(GKK).mean()
    if damp > 0 and lam <= 0:  # every kept input was always zero: the data says nothing, keep the slice
        return WK.float()
    A = GKK + lam * torch.eye(len(keep), dtype=G.dtype, device=G.device)
    B = W @ G[:, keep] + lam * WK  # [out, |K|];  W' A = B, A symmetric
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0:
        raise LoramError("the calibration Gram matrix is singular even after dampening: give more "
                         "calibration data (--calib-samples / --calib-seq-len)")
    return torch.cholesky_solve(B.t(), L).t().float()


def _targets(model, plan: PrunePlan) -> list[tuple[int, str, torch.Tensor]]:
    """(layer, role, kept columns) of every o/down projection the plan prunes."""
    return [(i, role, idx) for i, role, idx in plan.pruned_modules(geometry(model.config)) if role in COL_PRUNED]


def _chunks(model, targets: list, budget: int) -> list[list]:
    """``targets`` split so that each chunk's fp32 Grams fit ``budget`` bytes (at least one per chunk)."""
    chunks, cur, used = [], [], 0
    for t in targets:
        n = layer_module(model, t[0], t[1]).in_features ** 2 * 4
        if cur and used + n > budget:
            chunks.append(cur)
            cur, used = [], 0
        cur.append(t)
        used += n
    return chunks + ([cur] if cur else [])


def gram_hooks(linears: dict):
    """{key: Hessian} accumulating X^T X of each linear's input in ``linears`` ({key: nn.Linear}) over every
    forward run while the context is open."""
    return input_stats(linears, Hessian)


def _grams(model, chunk: list, batches: list[torch.Tensor]) -> dict[tuple[int, str], Hessian]:
    """{(layer, role): running X^T X of that projection's input} over one forward of every batch."""
    dev = next(model.parameters()).device
    with gram_hooks({(i, role): layer_module(model, i, role) for i, role, _ in chunk}) as grams, torch.no_grad():
        for ids in batches:
            model(input_ids=ids.to(dev), use_cache=False)
    return grams


def compensation(model, plan: PrunePlan, batches: list[torch.Tensor], damp: float = DAMP,
                 budget: int = GRAM_BYTES) -> dict[tuple[int, str], torch.Tensor]:
    """{(layer, role): refitted kept columns} for the o/down projections ``plan`` prunes, from the
    ORIGINAL (not yet shrunk) ``model`` run on ``batches``. Apply with ``apply_compensation`` after apply_plan."""
    out = {}
    chunks = _chunks(model, _targets(model, plan), budget)
    for chunk in track(chunks, "compensate: calibration passes", unit="pass"):
        grams = _grams(model, chunk, batches)
        for i, role, idx in chunk:
            out[(i, role)] = compensated_columns(layer_module(model, i, role).weight, grams.pop((i, role)).H, idx, damp)
    return out


def streamed_refits(weights, config, plan: PrunePlan, batches: list[torch.Tensor], dtype=torch.float32, device="cpu",
                    damp: float = DAMP):
    """Yield, for decoder layer 0, 1, ... in order, {role: refitted kept columns} of that layer's pruned o/down
    ({} for a layer the plan keeps whole), computed on the ORIGINAL layers streamed from ``weights``
    over the original hidden states (in ``dtype`` on ``device``)."""
    from ..stream import LayerStream

    g = geometry(config)
    keep = {i: {r: idx for r in COL_PRUNED if (idx := plan.kept_index(i, r, g)) is not None} for i in plan.pruned}
    last = max((i for i, k in keep.items() if k), default=-1)
    ls = LayerStream(weights, config, dtype=dtype, device=device, head=False)
    xs = ls.inputs(batches)
    ls.drop_outer()  # the embeddings served their purpose: only decoder layers from here on
    for i in range(ls.n_layers):
        if i > last:  # nothing refitted above the last pruned layer: no need to run it
            yield {}
            continue
        block = ls.load(i)
        with gram_hooks({role: block.get_submodule(MODULE_OF_ROLE[role]) for role in keep.get(i, {})}) as grams:
            xs = [ls.run(block, x) for x in xs]
        new = {role: compensated_columns(block.get_submodule(MODULE_OF_ROLE[role]).weight, grams.pop(role).H, idx, damp)
               for role, idx in keep.get(i, {}).items()}
        ls.unload(i)
        yield new


def apply_compensation(model, new: dict[tuple[int, str], torch.Tensor]) -> None:
    """Write the refitted columns into the shrunk (apply_plan'd) projections of ``model``."""
    for (i, role), w in new.items():
        write_refit(layer_module(model, i, role), w)


def plan_calibration(tokenizer, method: str, compensate: bool, source: str | None, n: int, seq_len: int,
                     damp: float = DAMP) -> tuple[list | None, dict | None, dict | None]:
    """(calibration batches, the plan's ``calibration``, the plan's ``compensation``) of a structured prune, in
    memory or streamed: the text is read when the method scores on it or --compensate refits on it (magnitude /
    random then read it too, and only ``compensation`` records it)."""
    if method not in CALIBRATED and not compensate:
        return None, None, None
    batches, desc = calibration_batches(tokenizer, source, n, seq_len)
    return batches, desc if method in CALIBRATED else None, compensation_record(desc, damp) if compensate else None


def write_refit(lin, w: torch.Tensor) -> None:
    """Put refitted kept columns ``w`` into the shrunk projection ``lin`` (its dtype and device kept)."""
    if tuple(w.shape) != tuple(lin.weight.shape):
        raise LoramError(f"refitted weight is {list(w.shape)}, the plan needs {list(lin.weight.shape)}: this is a loram bug")
    with torch.no_grad():
        lin.weight.copy_(w.to(lin.weight.device, lin.weight.dtype))


def compensation_record(calib: dict, damp: float = DAMP) -> dict:
    """What the plan records (PrunePlan.compensation): the update cannot be rebuilt by slicing the original."""
    return {"method": "least-squares", "roles": list(COL_PRUNED), "damp": damp, "calibration": calib}
