"""The fused CPU decode step: one C++ call per token (cpu_decode.cpp) instead of ~750 small aten ops.

    parts = DecoderParts.of(model)
    reason = unsupported_reason(parts, cache)        # None where it can run here
    variant = variant_for(parts.dtype)               # "avx512" or "avx2" at this machine's ISA level
    decoder = CpuDecoder(parts, cache, load_library(variant), derived, variant)   # what the backend does
    logits = decoder(input_ids, positions, slots, kv_len)   # [R, 1, V], like model(...).logits

It computes what `model(input_ids, position_ids=positions, kv_cache=cache, cache_slots=slots,
logits_to_keep=1, kv_len=kv_len).logits` computes, for the text decoder only (decode steps carry no
images), and writes the new keys/values into the same `KVCache`, so the plain model can prefill and
this kernel decode. At batch 1 it reads the model's own weight tensors and the cache buffers through raw
pointers, copying nothing. The first bf16 step of two or more rows makes packed copies of the decoder's
matrices and the lm_head (as much memory again as those weights: 270 MB for SmolVLM-256M; made only where
they take at most half the memory available), kept in the backend's `DerivedWeights` store (so counted and
shared by later decoders), on which batches run 1.8x faster (cpu_decode.cpp, packed_tile). On CPUs with AMX
the backend may instead run batches on AMX tiles over the model's own weights (`use_amx`), which needs no copy.

Quantised weights: each matrix (q, k, v, o, gate, up, down, the head) and the embedding table may be dense in
the model's dtype or a `QuantLinear` / `QuantEmbedding` (int8, int4, int4 with minimums, any group size of
quant/format.py). The kernel streams the stored codes, at batch 1 and in batches, so a step reads half (int8) or
about a third (int4) of the bytes of bf16. Where the AVX-512 build runs on a CPU with AVX512-VNNI, each matrix
input is rounded once per step to int8 per run of 32 (quant/format.py's quantize_inputs) and multiplied by the
codes in integers (cpu_decode_quant_vnni.h: ~3x fewer instructions per weight, which is what lets int4 decode
keep up with the memory); elsewhere, or with IDEFICS3_QUANT_INPUTS=fp32, the codes are dequantised in registers
against fp32 inputs (cpu_decode_quant.h, cpu_decode_quant_avx2.h), as exact as the plain path (`quant_inputs`).
Packed copies and AMX tiles are for dense bf16 weights: a quantised model gets neither.
A decoder is bound to the tensors it saw when built: the backend builds one per engine, and
`unsupported_reason` refuses a model whose decoder linears are neither plain nn.Linear nor QuantLinear (LoRA,
say), or have a bias.

The source is compiled once per machine (build.py), in the variant of this machine's ISA level
(`variant_for`): cpu_decode.cpp needs AVX-512 (F, BW, VL, DQ), plus AVX512-BF16 for bf16 weights;
cpu_decode_avx2.cpp runs on AVX2 + FMA + F16C; IDEFICS3_KERNELS=0, other devices, dtypes or CPUs, biases
and a failed build each give a reason, and the engine keeps the plain path. This module reads the model
through `DecoderParts` (the decoder, its head and their config) and does not import the model class.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import TextConfig
from ..device import cpu_isa, isa_flags
from ..model.kv_cache import KVCache
from ..model.text import TextModel
from ..quant.format import QuantError, QuantSpec, check_tensors
from ..quant.modules import QuantEmbedding, QuantLinear
from .build import AMX_CFLAGS, AVX2_CFLAGS, CFLAGS, ENV_SWITCH, compile_library, kernels_enabled
from .derived import DerivedWeights

SOURCE = Path(__file__).with_name("cpu_decode.cpp")
# variant: (source, compiler flags, flags tried first); both sources export the same C functions
VARIANTS = {"avx512": (SOURCE, tuple(CFLAGS), tuple(AMX_CFLAGS)),
            "avx2": (Path(__file__).with_name("cpu_decode_avx2.cpp"), tuple(AVX2_CFLAGS), ())}
SUPPORTED_HEAD_DIMS = (16, 32, 64, 96, 128, 256)  # attention is specialised per head size
_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
# The tables idefics3_decoder_create reads (cpu_decode_model.h): a weight is (data, scales, mins, kind, group,
# stored columns); a layer row is ln1, ln2, k cache, v cache, then the weights of _PROJECTIONS. The library
# reports its own.
ABI_VERSION = 2
WEIGHT_FIELDS = 6
LAYER_FIELDS = 4 + len(_PROJECTIONS) * WEIGHT_FIELDS
_DENSE, _INT8, _INT4, _INT4_MINS = 0, 1, 2, 3  # cpu_decode_model.h's WeightKind
ENV_QUANT_INPUTS = "IDEFICS3_QUANT_INPUTS"
QUANT_INPUTS = ("int8", "fp32")


def _sources_digest(source: Path) -> str:
    """A digest of a build's source and the headers beside it: part of the library's name, so that a changed
    header builds a new library (torch's extension builder watches only the listed source) and two source
    versions never overwrite each other's build."""
    digest = hashlib.blake2b(digest_size=4)
    for path in [source, *sorted(source.parent.glob("*.h"))]:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def variant_for(dtype: torch.dtype) -> str | None:
    """Which build of the kernel runs weights of `dtype` at this machine's ISA level (`cpu_isa`): the AVX-512
    one (bf16 through AVX512-BF16, AMX tiles for batches where present), the AVX2 + FMA one (bf16 widened to
    fp32 in registers), or None below AVX2."""
    level = cpu_isa()
    if level in ("avx512_bf16", "amx") or (level == "avx512" and dtype == torch.float32):
        return "avx512"
    return "avx2" if level in ("avx2", "avx512") else None


@functools.cache
def load_library(variant: str = "avx512") -> ctypes.CDLL | str:
    """The compiled kernel library of one variant with its signatures declared, or why it could not be built."""
    source, cflags, optional = VARIANTS[variant]
    lib = compile_library(f"idefics3_cpu_decode_{variant}_{_sources_digest(source)}", source, cflags, optional)
    if isinstance(lib, str):
        return lib
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.idefics3_decoder_abi.argtypes = [ptr]
    abi = (ctypes.c_int64 * 3)()
    lib.idefics3_decoder_abi(abi)
    if tuple(abi) != (ABI_VERSION, LAYER_FIELDS, WEIGHT_FIELDS):
        return (f"the kernel library {source.name} takes tables of version {tuple(abi)}, this module passes "
                f"{(ABI_VERSION, LAYER_FIELDS, WEIGHT_FIELDS)}")
    lib.idefics3_decoder_create.restype = ptr
    lib.idefics3_decoder_create.argtypes = [ctypes.c_int, *[i64] * 9, ctypes.c_float, ptr, ptr, ptr, ptr]
    lib.idefics3_decoder_destroy.argtypes = [ptr]
    lib.idefics3_dequantize.argtypes = [ptr, i64, i64, ptr, ctypes.c_int, ctypes.c_int]
    lib.idefics3_decoder_set_packed.argtypes = [ptr, ptr, ptr]
    lib.idefics3_decoder_step.restype = ctypes.c_int
    lib.idefics3_decoder_step.argtypes = [ptr, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ctypes.c_int]
    lib.idefics3_quant_linear.argtypes = [ptr, i64, i64, ptr, i64, ptr, ctypes.c_int, ctypes.c_int]
    if variant == "avx512":
        lib.idefics3_decoder_set_int8_inputs.argtypes = [ptr, ctypes.c_int]
        lib.idefics3_quant_matmul_amx.restype = ctypes.c_int
        lib.idefics3_quant_matmul_amx.argtypes = [ptr, i64, i64, ptr, i64, ptr, ctypes.c_int]
        lib.idefics3_amx_init.restype = ctypes.c_int
        lib.idefics3_decoder_set_amx.argtypes = [ptr, i64]
    return lib


def has_int8_inputs(variant: str) -> bool:
    """Whether this build can take int8 inputs here: the AVX-512 one on a CPU with AVX512-VNNI."""
    return variant == "avx512" and "avx512_vnni" in isa_flags()


def quant_inputs(variant: str) -> str:
    """How the quantised products of this build take x: "int8" (rounded per run of 32 inputs to int8 codes and
    multiplied in integers, cpu_decode_quant_vnni.h: the fast path, where the AVX-512 build runs on a CPU with
    AVX512-VNNI) or "fp32" (cpu_decode_quant.h / cpu_decode_quant_avx2.h: x as it is, the weights widened).
    IDEFICS3_QUANT_INPUTS=fp32 asks for the latter anywhere; asking for int8 where VNNI is missing is refused."""
    asked = os.environ.get(ENV_QUANT_INPUTS, "").strip().lower()
    if asked and asked not in QUANT_INPUTS:
        raise ValueError(f"{ENV_QUANT_INPUTS}={asked!r} is not one of {', '.join(QUANT_INPUTS)}")
    vnni = has_int8_inputs(variant)
    if asked == "int8" and not vnni:
        raise ValueError(f"{ENV_QUANT_INPUTS}=int8 needs the AVX-512 build on a CPU with AVX512-VNNI "
                         f"(this one runs the {variant} build; ISA level {cpu_isa()})")
    return "int8" if vnni and asked != "fp32" else "fp32"


def amx_reason(lib: ctypes.CDLL, variant: str, quantised: bool = False) -> str | None:
    """Why batched bf16 steps cannot run on AMX tiles here (for a model with `quantised` matrices: never, the
    tiles multiply dense bf16 weights), or None when they can."""
    if quantised:
        return "the weights are quantised (AMX tiles run dense bf16 weights)"
    if variant != "avx512" or cpu_isa() != "amx":
        return f"the ISA level is {cpu_isa()}, not amx"
    state = lib.idefics3_amx_init()
    return {0: None, 1: "the compiler built the kernel without AMX"}.get(state, "Linux refused the AMX tile state")


@dataclass
class DecoderParts:
    """What the kernel reads of a model: its text decoder, output head and their config."""

    text: TextModel
    lm_head: nn.Module
    config: TextConfig

    @classmethod
    def of(cls, model: nn.Module) -> DecoderParts:
        """The parts of an Idefics3 model (`model.model.text_model`, `model.lm_head`, its text config)."""
        return cls(model.model.text_model, model.lm_head, model.config.text_config)

    @property
    def dtype(self) -> torch.dtype:
        return self.text.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.text.norm.weight.device

    @property
    def quantised(self) -> bool:
        """Whether any matrix the kernel reads (decoder linears, head, embedding) is quantised."""
        return any(isinstance(m, (QuantLinear, QuantEmbedding)) for _, m in _matrices(self))

    def formats(self) -> str:
        """How the matrices are stored, for descriptions and calibration keys: "dense", or e.g.
        "decoder int4-g32, lm_head int8-g32, embed_tokens int8-g32" (each part "dense" or its formats)."""
        if not self.quantised:
            return "dense"
        groups: dict[str, list[nn.Module]] = {"decoder": [], "lm_head": [], "embed_tokens": []}
        for name, module in _matrices(self):
            groups[name if name in groups else "decoder"].append(module)
        return ", ".join(f"{part} {'+'.join(sorted({_format_name(m) for m in modules}))}"
                         for part, modules in groups.items())


def machine_reason(dtype: torch.dtype, device: torch.device) -> str | None:
    """Why this machine cannot run the kernel for weights of this dtype and device (the build included)."""
    if not kernels_enabled():
        return f"{ENV_SWITCH}=0"
    if device.type != "cpu":
        return f"the model is on {device.type}, not the CPU"
    if dtype not in _DTYPES:
        return f"no kernel for {dtype}"
    variant = variant_for(dtype)
    if variant is None:
        return f"this CPU's ISA level is {cpu_isa()}: the kernel needs AVX2 + FMA + F16C at least"
    lib = load_library(variant)
    return lib if isinstance(lib, str) else None


def unsupported_reason(parts: DecoderParts, cache: KVCache | None = None) -> str | None:
    """Why the kernel cannot decode for this model (and cache) here, or None when it can."""
    dtype, t = parts.dtype, parts.config
    reason = machine_reason(dtype, parts.device)
    if reason is not None:
        return reason
    if t.attention_bias or t.mlp_bias:
        return "the decoder has biases"
    if t.head_dim not in SUPPORTED_HEAD_DIMS:
        return f"head_dim {t.head_dim} is not one of {SUPPORTED_HEAD_DIMS}"
    for name, module in _linears(parts):
        if not _plain_matrix(module) or module.bias is not None:
            return f"{name} is a {type(module).__name__}, not a plain nn.Linear or QuantLinear without bias"
    embed = parts.text.embed_tokens
    if type(embed) not in (nn.Embedding, QuantEmbedding):
        return f"embed_tokens is a {type(embed).__name__}, not an nn.Embedding or QuantEmbedding"
    if isinstance(embed, QuantEmbedding) and embed.dtype != dtype:
        return f"embed_tokens gives {embed.dtype} rows, the model is {dtype}"
    for name, module in _matrices(parts):
        shape, expected = _shape(module), _expected_shape(name, t)
        if shape != expected:
            return f"{name} is [{shape[0]}, {shape[1]}]; the config says [{expected[0]}, {expected[1]}]"
        if isinstance(module, (QuantLinear, QuantEmbedding)):
            reason = _quant_reason(name, module)
            if reason is not None:
                return reason
    for name, w in _tensors(parts):
        if w.dtype != dtype or w.device.type != "cpu" or not w.is_contiguous():
            return f"{name} is not a contiguous {dtype} CPU tensor"
    if cache is None:
        return None
    if cache.device.type != "cpu":
        return f"the cache is on {cache.device.type}, not the CPU"
    if cache.dtype != dtype:
        return f"the cache is {cache.dtype}, the model {dtype}"
    expect = (cache.max_batch, t.num_key_value_heads, cache.max_seq_len, t.head_dim)
    if any(tuple(b.shape) != expect or not b.is_contiguous() for b in (*cache.k, *cache.v)):
        return "the cache buffers do not have the [batch, kv heads, positions, head_dim] layout"
    return None


def _plain_matrix(module: nn.Module) -> bool:
    """A plain nn.Linear, or a QuantLinear (or a view of one, as quant_prefill's FastQuantLinear, which differs
    only in how it prefills; LoRA wraps rather than subclasses): what the kernel reads as one matrix."""
    return type(module) is nn.Linear or isinstance(module, QuantLinear)


def _quant_reason(name: str, module: QuantLinear | QuantEmbedding) -> str | None:
    """Why the kernel cannot read this quantised module's tensors (CPU, contiguous, the spec's dtypes and
    shapes), or None."""
    tensors = module.quant_tensors()
    if any(t.device.type != "cpu" or not t.is_contiguous() for t in tensors.values()):
        return f"{name}'s quantised tensors are not contiguous CPU tensors"
    try:
        check_tensors(module.spec, (module.rows, module.cols), tensors, name)
    except QuantError as err:
        return str(err)
    return None


def _linears(parts: DecoderParts) -> list[tuple[str, nn.Module]]:
    layers = parts.text.layers
    out = [(f"layers.{i}.{p}", layer.get_submodule(p)) for i, layer in enumerate(layers) for p in _PROJECTIONS]
    return out + [("lm_head", parts.lm_head)]


def _shape(module: nn.Module) -> tuple[int, int]:
    """[N, K] of a matrix module (out, in; for embeddings rows, dim)."""
    if isinstance(module, (QuantLinear, QuantEmbedding)):
        return module.rows, module.cols
    return tuple(module.weight.shape)


def _expected_shape(name: str, t: TextConfig) -> tuple[int, int]:
    """[N, K] the kernel reads for the matrix `name` of _matrices."""
    d, nq, nk = t.hidden_size, t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    leaf = name.rsplit(".", 1)[-1]
    return {"q_proj": (nq, d), "k_proj": (nk, d), "v_proj": (nk, d), "o_proj": (d, nq),
            "gate_proj": (t.intermediate_size, d), "up_proj": (t.intermediate_size, d),
            "down_proj": (d, t.intermediate_size), "lm_head": (t.vocab_size, d),
            "embed_tokens": (t.vocab_size, d)}[leaf]


def _matrices(parts: DecoderParts) -> list[tuple[str, nn.Module]]:
    """The decoder linears, the head and the embedding table: every matrix the kernel reads."""
    return _linears(parts) + [("embed_tokens", parts.text.embed_tokens)]


def _format_name(module: nn.Module) -> str:
    return module.spec.name if isinstance(module, (QuantLinear, QuantEmbedding)) else "dense"


def _tensors(parts: DecoderParts) -> list[tuple[str, torch.Tensor]]:
    """The dense tensors the kernel reads in the model's dtype: norms and the matrices that are not quantised."""
    text = parts.text
    out = [("norm", text.norm.weight)]
    for i, layer in enumerate(text.layers):
        out += [(f"layers.{i}.input_layernorm", layer.input_layernorm.weight),
                (f"layers.{i}.post_attention_layernorm", layer.post_attention_layernorm.weight)]
    return out + [(name, m.weight) for name, m in _matrices(parts) if not isinstance(m, (QuantLinear, QuantEmbedding))]


def _kind(spec: QuantSpec) -> int:
    return _INT8 if spec.bits == 8 else _INT4_MINS if spec.asymmetric else _INT4


def weight_fields(module: nn.Module) -> tuple[list[int], list[torch.Tensor]]:
    """A matrix as the kernel's Weight (data, scales, mins, kind, group, stored columns: K padded as
    quant/format.py pads it) and the tensors those addresses are in (to be kept referenced while the kernel may
    read them)."""
    if isinstance(module, (QuantLinear, QuantEmbedding)):
        tensors = list(module.quant_tensors().values())
        mins = module.mins.data_ptr() if module.mins is not None else 0
        stored = module.qweight.shape[1] * (2 if module.spec.bits == 4 else 1)  # Kp
        return ([module.qweight.data_ptr(), module.scales.data_ptr(), mins, _kind(module.spec),
                 module.spec.group(module.cols), stored], tensors)
    return [module.weight.data_ptr(), 0, 0, _DENSE, 0, module.weight.shape[1]], [module.weight]


def weight_table(module: QuantLinear) -> torch.Tensor:
    """The module's Weight table (weight_fields) as the C entries take it, kept with the module and remade when
    its tensors are other ones (new addresses)."""
    key = tuple(t.data_ptr() for t in module.quant_tensors().values())
    cached = module.__dict__.get("_idefics3_weight_table")
    if cached is None or cached[0] != key:
        fields, _ = weight_fields(module)
        cached = (key, torch.tensor(fields, dtype=torch.int64))
        module.__dict__["_idefics3_weight_table"] = cached
    return cached[1]


def quant_linear(lib: ctypes.CDLL, module: QuantLinear, x: torch.Tensor, int8_inputs: bool) -> torch.Tensor:
    """x [R, K] times a QuantLinear's matrix by a build's quantised products alone, the codes streamed once for
    all rows (int8 inputs: the AVX-512 build only): [R, N] fp32. A prefill's few-row calls (quant_prefill.py),
    tests and benchmarks; decoding runs the same products inside the fused step."""
    if int8_inputs and not hasattr(lib, "idefics3_decoder_set_int8_inputs"):
        raise ValueError("int8 inputs need the AVX-512 build of the decode kernel")
    x = x.float().contiguous()
    y = torch.empty(x.shape[0], module.rows)
    lib.idefics3_quant_linear(weight_table(module).data_ptr(), module.rows, module.cols, x.data_ptr(), x.shape[0],
                              y.data_ptr(), int(int8_inputs), torch.get_num_threads())
    return y


def available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes, or None where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def pack_for_batches(w: torch.Tensor) -> torch.Tensor:
    """A bf16 weight [N, K] (K even) in the layout of cpu_decode.cpp's packed_tile: [ceil(N/32), K/2, 32, 2],
    output columns zero-padded to whole tiles of 32."""
    n, k = w.shape
    padded = torch.zeros(-(-n // 32) * 32, k, dtype=w.dtype)
    padded[:n] = w
    return padded.view(-1, 32, k // 2, 2).permute(0, 2, 1, 3).contiguous()  # [N/32, K/2, 32, 2]


def interleave_blocks(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate and up [I, K] as one [2 * ceil(I/16) * 16, K] whose 16-row blocks alternate gate, up."""
    i, k = gate.shape
    rows = -(-i // 16) * 16
    out = torch.zeros(2, rows, k, dtype=gate.dtype)  # [gate|up, I, K]
    out[0, :i], out[1, :i] = gate, up
    return out.view(2, rows // 16, 16, k).transpose(0, 1).reshape(2 * rows, k)  # [I/16, gate|up, 16, K]


class CpuDecoder:
    """One fused decode step over a model's text decoder and a KVCache (see the module docstring)."""

    def __init__(self, parts: DecoderParts, cache: KVCache, lib: ctypes.CDLL, derived: DerivedWeights,
                 variant: str = "avx512", inputs: str | None = None) -> None:
        """inputs: how quantised products take x, "int8" or "fp32" (None: `quant_inputs(variant)`)."""
        t = parts.config
        text = parts.text
        # the tensors stay referenced here, so the addresses below stay valid as long as this object lives
        self._tensors: list[torch.Tensor] = [text.norm.weight]
        rows = []
        for i, layer in enumerate(text.layers):
            norms_and_cache = [layer.input_layernorm.weight, layer.post_attention_layernorm.weight, cache.k[i],
                               cache.v[i]]
            self._tensors += norms_and_cache
            row = [w.data_ptr() for w in norms_and_cache]
            for name in _PROJECTIONS:
                fields, tensors = weight_fields(layer.get_submodule(name))
                row += fields
                self._tensors += tensors
            rows.append(row)
        table = torch.tensor(rows, dtype=torch.int64).reshape(len(rows), LAYER_FIELDS)  # [L, LAYER_FIELDS]
        embed, embed_tensors = weight_fields(text.embed_tokens)
        head, head_tensors = weight_fields(parts.lm_head)
        self._tensors += embed_tensors + head_tensors
        embed_t, head_t = (torch.tensor(f, dtype=torch.int64) for f in (embed, head))  # [WEIGHT_FIELDS] each
        self._lib, self._ptrs = lib, (table, embed_t, head_t)
        self.dtype = parts.dtype
        self.quantised = parts.quantised
        self.vocab_size, self.max_batch, self.max_seq_len = t.vocab_size, cache.max_batch, cache.max_seq_len
        self.rotary = text.rotary
        handle = lib.idefics3_decoder_create(
            _DTYPES[self.dtype], t.num_hidden_layers, t.hidden_size, t.intermediate_size, t.num_attention_heads,
            t.num_key_value_heads, t.head_dim, t.vocab_size, cache.max_batch, cache.max_seq_len, t.rms_norm_eps,
            table.data_ptr(), embed_t.data_ptr(), text.norm.weight.data_ptr(), head_t.data_ptr())
        self._handle = handle
        weakref.finalize(self, lib.idefics3_decoder_destroy, handle)
        # quantised products: x rounded to int8 and multiplied in integers where the CPU has VNNI (quant_inputs)
        if inputs not in (None, *QUANT_INPUTS):
            raise ValueError(f"inputs must be one of {QUANT_INPUTS} or None, got {inputs!r}")
        if inputs == "int8" and not has_int8_inputs(variant):
            raise ValueError("int8 inputs need the AVX-512 build on a CPU with AVX512-VNNI")
        self.inputs = (inputs or quant_inputs(variant)) if self.quantised else "fp32"
        if variant == "avx512":
            lib.idefics3_decoder_set_int8_inputs(handle, int(self.inputs == "int8"))
        self._parts, self._derived = parts, derived
        # batched bf16 steps run on packed copies of the weights, made at the first batch
        self._packed: list[torch.Tensor] | None = None
        self.variant = variant
        self.amx_rows = 0  # bf16 steps of at least this many rows run on AMX tiles (0: never); see use_amx
        # packed copies are of dense bf16 matrices: a quantised model streams its codes at every batch size
        self._can_pack = variant == "avx512" and self.dtype == torch.bfloat16 and not self.quantised and all(
            k % 2 == 0 for k in (t.hidden_size, t.num_attention_heads * t.head_dim, t.intermediate_size))
        if self._can_pack:  # copies as large as the decoder's matrices: only where they fit easily
            need = sum(m.weight.numel() * 2 for _, m in _linears(parts))
            room = available_memory()
            self._can_pack = room is None or need <= room // 2

    def use_amx(self, min_rows: int) -> None:
        """Run bf16 steps of `min_rows` rows or more on AMX tiles over the model's own weights (0: never). Where
        AMX serves every batch of two or more, no packed copies are made. Call only where `amx_reason` is None
        and the model is not quantised."""
        if self.quantised:
            raise ValueError("AMX tiles multiply dense bf16 weights; this model's are quantised")
        if self.dtype != torch.bfloat16 or amx_reason(self._lib, self.variant) is not None:
            raise ValueError("AMX tiles need bf16 weights and a CPU, compiler and OS that give them")
        self.amx_rows = min_rows
        self._lib.idefics3_decoder_set_amx(self._handle, min_rows)

    def _pack(self) -> None:
        """Packed bf16 copies of every decoder matrix and the lm_head for batched steps (as much memory again
        as those weights, so made only once a batch shows up, and kept by the backend for later decoders)."""
        parts = self._parts
        layers = parts.text.layers
        sources = [m.weight for _, m in _linears(parts)]  # what gets packed

        def pack() -> list[torch.Tensor]:
            out = []
            for layer in layers:
                a, m = layer.self_attn, layer.mlp
                qkv = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])  # [NQ + 2 NK, D]
                out += [pack_for_batches(qkv), pack_for_batches(a.o_proj.weight),
                        pack_for_batches(interleave_blocks(m.gate_proj.weight, m.up_proj.weight)),
                        pack_for_batches(m.down_proj.weight)]
            return out + [pack_for_batches(parts.lm_head.weight)]

        self._packed = self._derived.get(parts.text, "packed_decode", sources, pack)
        ptrs = torch.tensor([w.data_ptr() for w in self._packed[:-1]], dtype=torch.int64)  # [L * 4]
        lm_head = self._packed[-1]
        self._lib.idefics3_decoder_set_packed(self._handle, ptrs.data_ptr(), lm_head.data_ptr())

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor | None,
                 kv_len: int, shared: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, positions [R, 1] (long); slots [R] cache rows or None for 0..R-1 -> logits [R, 1, V].

        shared [R, 2] (long) or None: row r's positions 0..shared[r, 1]-1 hold the same keys and values in
        cache row shared[r, 0] as in its own, which is then read instead, so that rows decoding from one
        prompt read its keys once per step for all of them (the engine's `n` completions of one prompt).
        """
        rows = input_ids.shape[0]
        if input_ids.shape != (rows, 1) or positions.shape != (rows, 1):
            raise ValueError(f"decode takes one token per row: input_ids {tuple(input_ids.shape)}, "
                             f"positions {tuple(positions.shape)}")
        if kv_len > self.max_seq_len:
            raise ValueError(f"position {kv_len - 1} does not fit the KV cache ({self.max_seq_len} positions)")
        if rows >= 2 and self._can_pack and self._packed is None and not 0 < self.amx_rows <= rows:
            self._pack()
        ids = input_ids.reshape(rows).to(torch.long).contiguous()  # [R]
        pos = positions.reshape(rows).to(torch.long).contiguous()  # [R]
        rows_in_cache = None if slots is None else slots.reshape(rows).to(torch.long).contiguous()  # [R]
        if shared is not None:
            if shared.shape != (rows, 2):
                raise ValueError(f"shared must be [rows, 2] (slot, length), got {tuple(shared.shape)}")
            shared = shared.to(torch.long).contiguous()
        cos, sin = self.rotary(positions, self.dtype, kv_len)  # [R, 1, hd] each
        cos, sin = cos.contiguous(), sin.contiguous()
        logits = torch.empty(rows, 1, self.vocab_size, dtype=self.dtype)  # [R, 1, V]
        rc = self._lib.idefics3_decoder_step(
            self._handle, rows, ids.data_ptr(), pos.data_ptr(),
            None if rows_in_cache is None else rows_in_cache.data_ptr(),
            None if shared is None else shared.data_ptr(), cos.data_ptr(), sin.data_ptr(),
            logits.data_ptr(), torch.get_num_threads())
        if rc:
            what = {1: f"a token id outside 0..{self.vocab_size - 1}",
                    2: f"a position outside 0..{self.max_seq_len - 1}",
                    3: f"a slot outside 0..{self.max_batch - 1}",
                    4: "a shared prefix outside the cache or longer than its row"}[rc]
            raise ValueError(f"decode got {what}")
        return logits
