"""The quantised weight formats: int8 and int4, symmetric, in groups along the input dimension, fp16 scales.

One matrix W [N, K] (out, in) is stored as
- int8: `qweight` int8 [N, K] and `scales` fp16 [N, K/G]:  W[n, k] = scales[n, k // G] * qweight[n, k];
- int4: `qweight` uint8 [N, K/2] holding 4-bit codes c in 0..15 and `scales` fp16 [N, K/G]:
  W[n, k] = scales[n, k // G] * (c - 8), or, where a `mins` fp16 [N, K/G] is present (asymmetric, llama.cpp's
  Q4_1), W[n, k] = scales[n, k // G] * c + mins[n, k // G].

The codes of each run of 32 inputs sit in 16 bytes exactly as in llama.cpp's Q4_0/Q4_1 blocks: byte j of the
run holds input j in its low nibble and input j + 16 in its high nibble. With G = 32 an int8 matrix is a Q8_0
tensor and an int4 one a Q4_0 (or, with mins, Q4_1) tensor, byte for byte apart from where the scales live,
so GGUF files load without requantising. G is 32 (the default), 64 or 128; a larger G stores fewer scales;
int8 also takes G = 0, one scale per output channel (scales [N, 1]).

An input size K that the groups (or int4's runs of 32) do not divide is padded: the stored tensors cover
Kp = K rounded up to a multiple of G (and of 32 for int4) columns, the padding quantised from zeros, and every
user of the weights reads only the first K columns (the matrix is [N, K]; inputs beyond K count as zero).

Quantising: int8 takes scale = max|w| / 127 per group. int4 tries a few scales per group, max / (-8 + t) for
small t around 0 with max the signed value of largest magnitude (llama.cpp's Q4_0 choice is t = 0), and keeps
the one with the least squared error, each input's error weighted by its `importance` when one is given (GPTQ
passes the diagonal of its H, the inputs' second moments: an input the layer sees large is rounded more
carefully). Codes are computed from the fp16-rounded scale, so what is stored is exactly what was measured.
A wider search (t from -1 to 2 in quarter steps, each with a least-squares refit) lowered the weights' error
but not the model's: measured with bench/quant.py's corpora, it cut int4's mean KL divergence by 2-6% on the
Q4_1 reference and raised it by 5-7% on weights off the 4-bit grid, so it was not kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

GROUP_SIZES = (0, 32, 64, 128)  # 0: per output channel (int8 only)
BITS = (4, 8)
BLOCK = 32  # inputs per run of packed int4 codes (llama.cpp's QK4_0)
_INT4_TRIALS = (-0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0)  # t in max / (-8 + t)
_SEARCH_CHUNK = 1 << 19  # weights searched together (2 MB in fp32): the search's temporaries stay in cache,
# a [14336, 4096] matrix is searched in 1.0 s instead of 4.0 s at once (2 cores)


class QuantError(ValueError):
    """A quantised tensor or format description that cannot be used as it is."""


@dataclass(frozen=True)
class QuantSpec:
    """How one matrix is quantised: bits (4 or 8), group size along K, and int4 with per-group minimums."""

    bits: int = 4
    group_size: int = 32
    asymmetric: bool = False

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise QuantError(f"bits must be one of {BITS}, got {self.bits!r}")
        if self.group_size not in GROUP_SIZES:
            raise QuantError(f"group_size must be one of {GROUP_SIZES}, got {self.group_size!r}")
        if self.group_size == 0 and self.bits != 8:
            raise QuantError("per-channel scales (group_size 0) are for int8; int4 needs groups of 32, 64 or 128")
        if self.asymmetric and self.bits != 4:
            raise QuantError("only int4 has an asymmetric form (per-group minimums)")

    @property
    def name(self) -> str:
        group = f"-g{self.group_size}" if self.group_size else "-channel"
        return f"int{self.bits}" + ("-asym" if self.asymmetric else "") + group

    def group(self, in_features: int) -> int:
        """The number of inputs that share a scale in a matrix with this many inputs."""
        return self.group_size or in_features

    def padded(self, in_features: int) -> int:
        """Kp: the stored columns for K inputs (K rounded up to a multiple of the group, and of 32 for int4)."""
        unit = self.group(in_features)
        if self.bits == 4:
            unit = max(unit, BLOCK)  # group sizes are multiples of 32
        return -(-in_features // unit) * unit

    def fits(self, in_features: int) -> bool:
        """Whether a matrix with this many inputs takes this format without padding."""
        return in_features > 0 and self.padded(in_features) == in_features

    def shapes(self, out_features: int, in_features: int) -> dict[str, tuple[int, int]]:
        """The stored tensors and their shapes for an [out, in] matrix."""
        if in_features <= 0 or out_features <= 0:
            raise QuantError(f"cannot quantise a [{out_features}, {in_features}] matrix")
        kp = self.padded(in_features)
        packed = kp if self.bits == 8 else kp // 2
        groups = (out_features, kp // self.group(in_features))
        out = {"qweight": (out_features, packed), "scales": groups}
        if self.asymmetric:
            out["mins"] = groups
        return out

    def dtypes(self) -> dict[str, torch.dtype]:
        out = {"qweight": torch.int8 if self.bits == 8 else torch.uint8, "scales": torch.float16}
        if self.asymmetric:
            out["mins"] = torch.float16
        return out

    def nbytes(self, out_features: int, in_features: int) -> int:
        dt = self.dtypes()
        return sum(a * b * dt[k].itemsize for k, (a, b) in self.shapes(out_features, in_features).items())


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Codes uint8 [N, K] in 0..15 -> bytes [N, K/2] in the Q4_0 block layout (see the module docstring)."""
    n, k = codes.shape
    runs = codes.reshape(n, k // BLOCK, 2, BLOCK // 2)  # [N, K/32, low|high half, 16]
    return (runs[:, :, 0] | (runs[:, :, 1] << 4)).reshape(n, k // 2)  # [N, K/2]


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Bytes [N, K/2] -> codes uint8 [N, K] in 0..15 (the inverse of pack_int4)."""
    n, half = packed.shape
    runs = packed.reshape(n, half // (BLOCK // 2), 1, BLOCK // 2)  # [N, K/32, 1, 16]
    codes = torch.cat([runs & 0x0F, runs >> 4], dim=2)  # [N, K/32, 2, 16]
    return codes.reshape(n, half * 2)


def dequantize(spec: QuantSpec, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None = None,
               dtype: torch.dtype = torch.float32, in_features: int | None = None) -> torch.Tensor:
    """The matrix [N, K] the stored tensors stand for (K = in_features, default all stored columns), computed
    in fp32 and returned in `dtype`."""
    n = qweight.shape[0]
    k = qweight.shape[1] * (1 if spec.bits == 8 else 2)  # Kp
    groups = scales.shape[1]
    s = scales.float().reshape(n, groups, 1)  # [N, Kp/G, 1], broadcast over each group
    if spec.bits == 8:
        w = qweight.reshape(n, groups, k // groups).float() * s  # [N, Kp/G, G]
    else:
        codes = unpack_int4(qweight).reshape(n, groups, k // groups).float()  # [N, Kp/G, G]
        if mins is not None:
            w = torch.addcmul(mins.float().reshape(n, groups, 1), codes, s)
        else:
            w = codes.sub_(8).mul_(s)
    w = w.reshape(n, k)  # [N, Kp]
    if in_features is not None and in_features != k:
        w = w[:, :in_features]  # [N, K]
    return w.to(dtype)


def quantize_inputs(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] as the int8-input decode products see it (kernels/cpu_decode_quant_vnni.h): each run of 32
    inputs (the last zero-padded) rounded to int8 codes q = round(x * (1 / d)), d = max|x| / 127, all in fp32,
    and returned as d q in x's dtype. The reference the kernel is tested against."""
    k = x.shape[-1]
    pad = -k % BLOCK
    v = F.pad(x.float(), (0, pad)).reshape(*x.shape[:-1], -1, BLOCK)  # [..., Kp/32, 32]
    amax = v.abs().amax(-1, keepdim=True)  # [..., Kp/32, 1]
    d = amax / torch.full_like(amax, 127.0)  # a true division (aten multiplies by 1/127 for a scalar divisor)
    inv = torch.where(d > 0, torch.ones_like(d) / d, torch.zeros_like(d))
    q = (v * inv).round()
    return (q * d).reshape(*x.shape[:-1], -1)[..., :k].to(x.dtype)


def quantize(w: torch.Tensor, spec: QuantSpec, importance: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Quantise a matrix [N, K] -> {"qweight", "scales"[, "mins"]} (see the module docstring). importance [K]
    (optional, finite, >= 0) weighs each input's squared error in symmetric int4's scale search; int8's scale
    (the group's largest magnitude) and int4-asym's minimum and step (its range) do not search, so it does not
    change them."""
    if w.dim() != 2:
        raise QuantError(f"only matrices are quantised, got a tensor of shape {tuple(w.shape)}")
    n, k = w.shape
    spec.shapes(n, k)  # checks the shape
    if not torch.isfinite(w).all():
        raise QuantError("the matrix holds inf or nan values")
    if importance is not None and (importance.shape != (k,) or not bool(torch.isfinite(importance).all())
                                   or not bool((importance >= 0).all())):
        raise QuantError(f"importance must be [{k}], finite and >= 0, got {tuple(importance.shape)}")
    size, kp = spec.group(k), spec.padded(k)
    w = torch.nn.functional.pad(w.detach().float(), (0, kp - k))  # [N, Kp], zeros after K
    k = kp
    g = w.reshape(n, k // size, size)  # [N, Kp/G, G]
    if spec.bits == 8:
        scale = (g.abs().amax(dim=2) / 127).half()  # [N, K/G]
        s = scale.float().unsqueeze(2)
        q = torch.where(s > 0, g / s.clamp_min(1e-30), 0).round().clamp(-127, 127).to(torch.int8)
        return {"qweight": q.reshape(n, k), "scales": scale}
    if spec.asymmetric:
        return _quantize_int4_asym(g, n, k)
    weight = torch.ones(1, k // size, size, device=g.device) if importance is None else \
        torch.nn.functional.pad(importance.to(g.device, torch.float32), (0, kp - importance.shape[0])
                                ).reshape(1, k // size, size)  # [1, Kp/G, G]
    rows = max(1, _SEARCH_CHUNK // k)
    parts = [_quantize_int4(g[r:r + rows], weight) for r in range(0, n, rows)]
    codes = torch.cat([c for c, _ in parts]).reshape(n, k)  # [N, Kp] in 0..15
    return {"qweight": pack_int4(codes), "scales": torch.cat([s for _, s in parts])}


def _int4_codes(g: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Groups g [R, Kp/G, G] rounded with scales s [R, Kp/G, 1] to signed codes in -8..7 (fp32)."""
    return torch.where(s != 0, g / torch.where(s != 0, s, 1), 0).round().clamp(-8, 7)


def _quantize_int4(g: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int4 of groups g [R, Kp/G, G] with error weights [1, Kp/G, G] -> (codes uint8 [R, Kp/G, G] in
    0..15, scales fp16 [R, Kp/G]): the trial scale of least weighted squared error per group."""
    peak = g.gather(2, g.abs().argmax(dim=2, keepdim=True))  # [R, K/G, 1] the signed value of largest magnitude
    best_err = best_scale = None
    for t in _INT4_TRIALS:
        scale = (peak / (-8 + t)).half()  # [R, K/G, 1]
        s = scale.float()
        err = (weight * (_int4_codes(g, s) * s - g) ** 2).sum(dim=2, keepdim=True)  # [R, K/G, 1]
        if best_err is None:
            best_err, best_scale = err, scale
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
    codes = (_int4_codes(g, best_scale.float()) + 8).to(torch.uint8)
    return codes, best_scale.squeeze(2)


def _quantize_int4_asym(g: torch.Tensor, n: int, k: int) -> dict[str, torch.Tensor]:
    low, high = g.amin(dim=2, keepdim=True), g.amax(dim=2, keepdim=True)  # [N, K/G, 1]
    scale = ((high - low) / 15).half()
    mins = low.half()
    s, m = scale.float(), mins.float()
    codes = torch.where(s > 0, (g - m) / torch.where(s > 0, s, 1), 0).round().clamp(0, 15).to(torch.uint8)
    return {"qweight": pack_int4(codes.reshape(n, k)), "scales": scale.squeeze(2), "mins": mins.squeeze(2)}


def check_tensors(spec: QuantSpec, shape: tuple[int, int], tensors: dict[str, torch.Tensor], where: str) -> None:
    """Raise QuantError naming `where` and the tensor when the stored tensors do not fit `spec` and `shape`."""
    n, k = shape
    expect, dtypes = spec.shapes(n, k), spec.dtypes()
    for name, want in expect.items():
        t = tensors.get(name)
        if t is None:
            raise QuantError(f"{where}.{name} is missing ({spec.name} needs {', '.join(expect)})")
        if tuple(t.shape) != want or t.dtype != dtypes[name]:
            raise QuantError(f"{where}.{name} is {t.dtype} {list(t.shape)}; {spec.name} of a [{n}, {k}] matrix "
                             f"needs {dtypes[name]} {list(want)}")
    extra = set(tensors) - set(expect)
    if extra:
        raise QuantError(f"{where} has tensors {sorted(extra)} that {spec.name} does not use")
