"""The modules that hold quantised weights: `QuantLinear` (for nn.Linear) and `QuantEmbedding` (for nn.Embedding).

They store the tensors of quant/format.py as buffers named `qweight`, `scales` and (int4 with minimums) `mins`,
so a quantised checkpoint's keys are `<module>.qweight` and so on, next to a dense `<module>.bias` where the
layer has one. Their plain forward dequantises and runs the dense op in the activations' dtype: the reference
every faster path (the fused CPU decode kernel, aten's packed int8/int4 products) is tested against. They
are frozen: nothing here is trainable apart from a bias (LoRA trains adapters beside them).

A tied output head shares its embedding's buffers: `QuantLinear.tied_to(embedding)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .format import QuantSpec, check_tensors, dequantize, quantize


class _Quantised(nn.Module):
    """Shared by both modules: the buffers of one [N, K] matrix in `spec`'s format."""

    def __init__(self, rows: int, cols: int, spec: QuantSpec, device: torch.device | str | None) -> None:
        super().__init__()
        self.spec = spec
        self.rows, self.cols = rows, cols
        shapes, dtypes = spec.shapes(rows, cols), spec.dtypes()
        for name, shape in shapes.items():
            self.register_buffer(name, torch.zeros(shape, dtype=dtypes[name], device=device))
        if not spec.asymmetric:
            self.mins = None

    def quant_tensors(self) -> dict[str, torch.Tensor]:
        out = {"qweight": self.qweight, "scales": self.scales}
        if self.mins is not None:
            out["mins"] = self.mins
        return out

    def set_quantised(self, tensors: dict[str, torch.Tensor], where: str = "") -> None:
        """Take stored tensors (checked against the spec and shape; QuantError names `where` otherwise)."""
        check_tensors(self.spec, (self.rows, self.cols), tensors, where or type(self).__name__)
        for name, t in tensors.items():
            setattr(self, name, t)

    def set_dense(self, weight: torch.Tensor) -> None:
        """Quantise a dense [N, K] matrix into this module."""
        self.set_quantised(quantize(weight, self.spec))

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense matrix [N, K] these buffers stand for."""
        return dequantize(self.spec, self.qweight, self.scales, self.mins, dtype, self.cols)

    def weight_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.quant_tensors().values())

    @property
    def device(self) -> torch.device:
        return self.qweight.device


class QuantLinear(_Quantised):
    """y = x W^T + b with W quantised (see the module docstring); bias dense, in `bias_dtype`."""

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, bias: bool = False,
                 device: torch.device | str | None = None, bias_dtype: torch.dtype = torch.float32) -> None:
        super().__init__(out_features, in_features, spec, device)
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=bias_dtype, device=device),
                                 requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QuantSpec) -> QuantLinear:
        """A quantised copy of a dense nn.Linear (its bias kept dense, in its dtype)."""
        w = linear.weight
        q = cls(linear.in_features, linear.out_features, spec, linear.bias is not None, w.device, w.dtype)
        q.set_dense(w)
        if linear.bias is not None:
            q.bias.data.copy_(linear.bias.detach())
        return q

    @classmethod
    def tied_to(cls, embedding: QuantEmbedding) -> QuantLinear:
        """An output head over the very same buffers as `embedding` (tie_word_embeddings)."""
        q = cls(embedding.embedding_dim, embedding.num_embeddings, embedding.spec, device="meta")
        q.set_quantised(embedding.quant_tensors())
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.spec.name}, " \
               f"bias={self.bias is not None}"


class QuantEmbedding(_Quantised):
    """Embedding rows from a quantised table [num_embeddings, dim]; rows come out in `dtype`."""

    def __init__(self, num_embeddings: int, embedding_dim: int, spec: QuantSpec, dtype: torch.dtype,
                 device: torch.device | str | None = None) -> None:
        super().__init__(num_embeddings, embedding_dim, spec, device)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.dtype = dtype

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, spec: QuantSpec) -> QuantEmbedding:
        w = embedding.weight
        q = cls(embedding.num_embeddings, embedding.embedding_dim, spec, w.dtype, w.device)
        q.set_dense(w)
        return q

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)  # [T]
        rows = {k: t.index_select(0, flat) for k, t in self.quant_tensors().items()}  # each [T, ...]
        dense = dequantize(self.spec, rows["qweight"], rows["scales"], rows.get("mins"), self.dtype,
                           self.embedding_dim)  # [T, D]
        return dense.reshape(*ids.shape, self.embedding_dim)  # [..., D]

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.spec.name}, dtype={self.dtype}"
