"""GPTQ: quantise a matrix so that its outputs on real inputs, not its weights, stay closest to the original.

Rounding each weight to the nearest code (format.py's `quantize`) minimises the weights' error. What matters is
the error of the layer's outputs, ||X W^T - X Q^T||^2 over the inputs X the layer sees. GPTQ (Frantar et al.,
2022) quantises one input column at a time and spreads each column's rounding error over the columns not yet
quantised, weighted by the inputs' second moments H = 2 X^T X / T, so that later columns absorb what earlier
ones lost. It needs a little calibration text (a few thousand tokens) run through the dense model once.

Built here for our formats exactly: the codes, scales and minimums are those format.py stores (int8, int4, int4
with minimums, any group size, padded inputs), so a GPTQ checkpoint is an ordinary quantised folder that every
kernel reads. Two refinements of the paper's method, both common practice (AutoGPTQ's `desc_act` with static
groups, llama.cpp's importance matrix):
- act order: the columns are quantised in order of decreasing H[k, k], so the inputs the layer sees largest
  are rounded first, while the most columns remain to absorb their error;
- the scales (and minimums) are chosen once, before any update, by format.py's `quantize`, whose symmetric int4
  search weighs each input's error by H[k, k] (int8 and int4-asym take their groups' ranges, as rounding does);
  every code of a group then rounds with its group's scale, whatever the order.
Blocks of 128 columns defer the updates to the rest of the matrix (the lazy batch of the paper). Hessians come
from the dense model in one pass (`collect_hessians`), not layer by layer from the quantised one: simpler, and
one forward per calibration window.

With H diagonal nothing spreads and the result is exactly `quantize`'s with H's diagonal as importance (tested).
Measured with bench/quant.py (the SmolLM2-135M decoder, 4096 calibration tokens outside the evaluation text, fp32
compute on both sides), mean KL divergence from the dense model on two corpora (chat answers; README text), int4
in groups of 32: rounding to nearest 0.225 and 0.282 nats, the paper's GPTQ 0.203 and 0.224, with act order and
weighted scales 0.112 and 0.134; on weights moved off the 4-bit grid (the bench's control) 0.425 and 0.562
rounded, 0.151 and 0.201 by GPTQ. int8: 0.0009 and 0.0013 rounded, 0.0005 and 0.0006 by GPTQ. How much it helps
depends on how close the calibration text is to what the model reads.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from .format import QuantError, QuantSpec, pack_int4, quantize

log = logging.getLogger(__name__)

BLOCK = 128  # columns whose updates to the rest of the matrix are deferred and applied at once
DAMP = 0.01  # added to H's diagonal, as a share of its mean: keeps the Cholesky factorisation well posed


MAX_HESSIAN_BYTES = 4 << 30  # Hessians held at once; more inputs take more passes over the calibration text


@torch.inference_mode()
def collect_hessians(model: nn.Module, names: list[str], windows: torch.Tensor,
                     max_bytes: int = MAX_HESSIAN_BYTES) -> dict[str, torch.Tensor]:
    """H = 2 X^T X / T [K, K] (fp32) of the inputs X [T, K] each named module sees while the model reads the
    token windows [W, T] (text only), one window per forward. The names are taken in passes of at most
    `max_bytes` of Hessians (the 8B model's 224 would need 34 GB at once), each pass a forward per window."""
    if windows.dim() != 2 or windows.numel() == 0:
        raise QuantError(f"calibration windows must be a non-empty [windows, tokens] tensor, got "
                         f"{tuple(windows.shape)}")
    out: dict[str, torch.Tensor] = {}
    for batch in _passes(model, names, max_bytes):
        out.update(_one_pass(model, batch, windows))
    return out


def _one_pass(model: nn.Module, names: list[str], windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """collect_hessians for names whose Hessians fit in memory together: one forward per window."""
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(names, 0)

    def hook(name: str):
        def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).float()  # [T, K]
            if name not in sums:
                sums[name] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
            sums[name].addmm_(x.T, x)
            counts[name] += x.shape[0]
        return record

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    device = next(model.parameters()).device
    try:
        for row in windows:
            model(input_ids=row[None].to(device))
    finally:
        for h in handles:
            h.remove()
    unseen = [n for n in names if counts[n] == 0]
    if unseen:
        raise QuantError(f"the calibration text never reached {', '.join(unseen[:3])}")
    return {n: 2 * sums[n].cpu() / counts[n] for n in names}


def calibration_windows(token_ids: list[int], tokens: int = 4096, window: int = 512) -> torch.Tensor:
    """The first `tokens` ids as windows [W, window] (a shorter text: one window of all of it)."""
    ids = token_ids[:tokens]
    if len(ids) < 16:
        raise QuantError(f"the calibration text has {len(ids)} tokens; GPTQ needs a few hundred at least")
    if len(ids) < window:
        return torch.tensor(ids)[None]  # [1, T]
    n = len(ids) // window
    return torch.tensor(ids[: n * window]).reshape(n, window)  # [W, window]


def _passes(model: nn.Module, names: list[str], max_bytes: int) -> list[list[str]]:
    """The names in order, cut into runs whose Hessians (4 K^2 bytes each) fit max_bytes (at least one each)."""
    passes: list[list[str]] = [[]]
    used = 0
    for name in names:
        size = 4 * model.get_submodule(name).in_features ** 2
        if passes[-1] and used + size > max_bytes:
            passes.append([])
            used = 0
        passes[-1].append(name)
        used += size
    return passes


def _codes(x: torch.Tensor, spec: QuantSpec, s: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
    """Column x [N] rounded as format.py rounds it with scales s (and minimums m) [N]: the stored codes."""
    safe = torch.where(s != 0, s, 1)
    if spec.bits == 8:
        return torch.where(s > 0, x / safe, 0).round().clamp(-127, 127)
    if m is not None:
        return torch.where(s > 0, (x - m) / safe, 0).round().clamp(0, 15)
    return torch.where(s != 0, x / safe, 0).round().clamp(-8, 7) + 8


def _value(c: torch.Tensor, spec: QuantSpec, s: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
    """What codes c stand for (format.py's dequantize)."""
    if spec.bits == 8:
        return c * s
    return c * s + m if m is not None else (c - 8) * s


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """Quantise W [N, K] given the inputs' H [K, K] -> {"qweight", "scales"[, "mins"]} as format.py stores them."""
    n, k = w.shape
    if hessian.shape != (k, k):
        raise QuantError(f"the Hessian is {tuple(hessian.shape)}; a [{n}, {k}] matrix needs [{k}, {k}]")
    kp, size = spec.padded(k), spec.group(k)
    w = F.pad(w.detach().float(), (0, kp - k))  # [N, Kp]
    h = torch.eye(kp)
    h[:k, :k] = hessian.float()
    dead = torch.diag(h) == 0  # inputs that were always zero: their weights do not matter
    h[dead, dead] = 1
    w[:, dead] = 0
    chosen = quantize(w, spec, importance=torch.diag(h).clamp_min(0))  # the scales (and minimums), fixed
    scales, mins = chosen["scales"], chosen.get("mins")  # [N, Kp/G]
    order = torch.argsort(torch.diag(h), descending=True, stable=True)  # act order: the largest inputs first
    w, h = w[:, order], h[order][:, order]  # [N, Kp], [Kp, Kp] in that order
    h += DAMP * torch.diag(h).mean() * torch.eye(kp)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)  # [Kp, Kp]
    codes = torch.zeros(n, kp)
    for b0 in range(0, kp, BLOCK):
        b1 = min(b0 + BLOCK, kp)
        block, errors, hb = w[:, b0:b1].clone(), torch.zeros(n, b1 - b0), hinv[b0:b1, b0:b1]  # [N, B], [B, B]
        for i in range(b1 - b0):
            g = int(order[b0 + i]) // size  # the group of this input in the stored layout
            s = scales[:, g].float()
            m = None if mins is None else mins[:, g].float()
            x = block[:, i]
            c = _codes(x, spec, s, m)
            codes[:, b0 + i] = c
            err = (x - _value(c, spec, s, m)) / hb[i, i]  # [N]
            block[:, i:] -= err[:, None] * hb[i, i:][None]  # [N, B - i]
            errors[:, i] = err
        w[:, b1:] -= errors @ hinv[b0:b1, b1:]  # [N, Kp - b1]
    codes = codes[:, torch.argsort(order)]  # [N, Kp] back in input order
    out = {"qweight": codes.to(torch.int8) if spec.bits == 8 else pack_int4(codes.to(torch.uint8)),
           "scales": scales}
    if mins is not None:
        out["mins"] = mins
    return out
