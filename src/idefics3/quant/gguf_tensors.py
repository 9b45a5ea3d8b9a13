"""One GGUF tensor -> the tensors our model stores for it, without requantising wherever the bytes agree.

llama.cpp's Q8_0, Q4_0 and Q4_1 blocks are our int8 / int4 / int4-with-mins formats in groups of 32 (see
quant/format.py), apart from where the scales live: a block is [fp16 scale (, fp16 min), codes], ours keeps the
codes of a row contiguous and the scales in a tensor of their own. So such a matrix is split, vectorised, into
`qweight` / `scales` (/ `mins`) with one copy and no arithmetic:

    Q8_0 block (34 B): d fp16 | 32 x int8                    -> qweight int8 [N, K],    scales [N, K/32]
    Q4_0 block (18 B): d fp16 | 16 B of nibbles               -> qweight uint8 [N, K/2], scales [N, K/32]
    Q4_1 block (20 B): d fp16 | m fp16 | 16 B of nibbles      -> ... and mins [N, K/32]

Any other quantisation (the K-quants Q2_K..Q6_K, Q5_0, Q5_1, the IQ types, ...) is dequantised by the gguf
package and quantised again by our `quantize()` to the nearest format: at most 4.5 bits per weight -> int4 g32,
more -> int8 g32. Dense types (F32, F16, BF16) stay dense; a quantised tensor whose module we keep dense (a norm,
a position embedding, a bias) is dequantised to fp32. The caller converts dense tensors to the load dtype.

llama.cpp's converter permutes the rows of the text model's q and k projections (within each head it interleaves
the two rotary halves, for its RoPE kernel); `unpermute_rows` puts them back. Rows of a quantised matrix move as
whole rows, scales with them, so the un-permutation is exact in every format.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from .format import QuantError, QuantSpec, quantize


class GGUFError(QuantError):
    """A GGUF file (or pair) that cannot be loaded as an Idefics3 / SmolVLM model; it names the file."""


T = GGMLQuantizationType
DENSE = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}
SAME_BYTES = {T.Q8_0: QuantSpec(8, 32), T.Q4_0: QuantSpec(4, 32), T.Q4_1: QuantSpec(4, 32, asymmetric=True)}
INT4_MAX_BITS = 4.5  # bits per weight (scales included) up to which a requantised type becomes int4


def bits_per_weight(kind: GGMLQuantizationType) -> float:
    block, nbytes = GGML_QUANT_SIZES[kind]
    return nbytes * 8 / block


def target_spec(kind: GGMLQuantizationType) -> QuantSpec | None:
    """The format a matrix of this GGUF type becomes: None for a dense type."""
    if kind in DENSE:
        return None
    if kind in SAME_BYTES:
        return SAME_BYTES[kind]
    return QuantSpec(4 if bits_per_weight(kind) <= INT4_MAX_BITS else 8, 32)


def unpermute_rows(raw: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation on the leading axis (rows of a matrix, raw block rows, or a bias).

    The converter wrote row h*D + 2i + j from row h*D + j*D/2 + i (head h, i < D/2, j in {0, 1})."""
    rows = raw.shape[0]
    half = rows // heads // 2
    order = np.arange(rows).reshape(heads, half, 2).swapaxes(1, 2).reshape(rows)  # ours -> file row
    return raw[order]


def _blocks(raw: np.ndarray, kind: GGMLQuantizationType) -> tuple[np.ndarray, int, int]:
    """[N, bytes] -> blocks [N, K/32, block bytes], N and K."""
    block, nbytes = GGML_QUANT_SIZES[kind]
    rows = raw.shape[0]
    groups = raw.shape[1] // nbytes
    return raw.reshape(rows, groups, nbytes), rows, groups * block


def _half(blocks: np.ndarray, start: int) -> torch.Tensor:
    """The fp16 at byte `start` of every block -> [N, K/32]."""
    return torch.from_numpy(np.ascontiguousarray(blocks[:, :, start:start + 2]).view(np.float16)[:, :, 0])


def split_blocks(raw: np.ndarray, kind: GGMLQuantizationType) -> dict[str, torch.Tensor]:
    """Q8_0 / Q4_0 / Q4_1 block rows [N, bytes] -> {"qweight", "scales"(, "mins")} in our layout (module docstring)."""
    blocks, rows, cols = _blocks(raw, kind)
    if kind == T.Q8_0:
        codes = np.ascontiguousarray(blocks[:, :, 2:]).view(np.int8).reshape(rows, cols)  # [N, K]
        return {"qweight": torch.from_numpy(codes), "scales": _half(blocks, 0)}
    start = 2 if kind == T.Q4_0 else 4
    packed = np.ascontiguousarray(blocks[:, :, start:]).reshape(rows, cols // 2)  # [N, K/2]
    out = {"qweight": torch.from_numpy(packed), "scales": _half(blocks, 0)}
    if kind == T.Q4_1:
        out["mins"] = _half(blocks, 2)
    return out


def dense(raw: np.ndarray, kind: GGMLQuantizationType, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor as floats of `shape`: dense types as stored (a view of the file where possible), quantised
    ones dequantised to fp32 by the gguf package. NotImplementedError for a type it cannot dequantise."""
    if kind in (T.F32, T.F16):
        return torch.from_numpy(raw).reshape(shape)
    if kind == T.BF16:  # the reader hands BF16 over as bytes
        return torch.from_numpy(raw).view(torch.bfloat16).reshape(shape)
    return torch.from_numpy(np.ascontiguousarray(gguf_dequantize(raw, kind), dtype=np.float32)).reshape(shape)


def quantised(raw: np.ndarray, kind: GGMLQuantizationType, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    """A quantised matrix [N, K] in the format `target_spec(kind)`: split when the bytes agree, else
    dequantised and quantised again. NotImplementedError for a type the gguf package cannot dequantise."""
    if kind in SAME_BYTES:
        return split_blocks(raw, kind)
    return quantize(dense(raw, kind, shape), target_spec(kind))
