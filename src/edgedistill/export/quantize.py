"""Weight quantisation for GGUF: which ggml type each tensor gets, and the bytes for it.

The export converts a model once to an F32 GGUF (export/gguf.py, llama.cpp's converter) and
`requantize` writes every other type from it, GGUF to GGUF: every metadata key is copied
(provenance included), each tensor gets its type from `tensor_type` and its bytes from `encode`.

Why our own: the installed llama.cpp runtime (xllamacpp) does not link `llama_model_quantize`
(measured: not in the library), and no PyPI wheel that has it loads on this glibc. Two routes
for the bytes: the `gguf` package quantises F16/BF16/Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 in Python but not
the K-quants; llama.cpp's own C quantiser (`ggml_quantize_chunk`) is exported by xllamacpp,
so K-quants go through it (ctypes — the binding has no Python wrapper). Its Q8_0/Q4_0 output
is byte-identical to gguf's.

What `llama-quantize` adds on top, the per-tensor policy of the "_M" mixes, is re-stated in
`tensor_type` so that Q4_K_M means what users expect: Q6_K for the output and for
attn_v/ffn_down in the layers that matter most, Q4_K elsewhere, with the same fallbacks when a
row does not split into 256-value super-blocks (on Gemma 3 270M our Q4_K_M gives every one of
its 236 tensors the type of the published llama.cpp Q4_K_M). Biases and MoE routers stay F32,
as llama.cpp requires. Small models also keep the token embedding / output at
`embeddings_type` (Q8_0 by default): tied-embedding models this size are known to collapse
otherwise (llama.cpp PR #5650).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import tempfile
from collections import Counter
from functools import cache
from pathlib import Path

import numpy as np
from gguf import (
    GGML_QUANT_SIZES,
    GGMLQuantizationType,
    GGUFReader,
    GGUFValueType,
    GGUFWriter,
    LlamaFileType,
)
from gguf import quants as gguf_quants

Q = GGMLQuantizationType

# Export types users pick: each names the main tensor type and the file type written.
EXPORT_TYPES: dict[str, tuple[GGMLQuantizationType, LlamaFileType]] = {
    "f32": (Q.F32, LlamaFileType.ALL_F32),
    "f16": (Q.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q5_0": (Q.Q5_0, LlamaFileType.MOSTLY_Q5_0),
    "q4_0": (Q.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    "q4_1": (Q.Q4_1, LlamaFileType.MOSTLY_Q4_1),
    "q6_k": (Q.Q6_K, LlamaFileType.MOSTLY_Q6_K),
    "q5_k_m": (Q.Q5_K, LlamaFileType.MOSTLY_Q5_K_M),
    "q4_k_m": (Q.Q4_K, LlamaFileType.MOSTLY_Q4_K_M),
}
# llama.cpp's fallbacks when a row is not a multiple of the K-quant super-block (256).
_FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}
_BITS = {Q.F32: 32, Q.F16: 16, Q.BF16: 16}


def _nominal_bits(qtype: GGMLQuantizationType) -> float:
    if qtype in _BITS:
        return _BITS[qtype]
    block, size = GGML_QUANT_SIZES[qtype]
    return size * 8 / block


def _more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's `use_more_bits`: the first and last eighth of the layers, and every third between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def _fits(qtype: GGMLQuantizationType, row: int) -> bool:
    return qtype in _BITS or row % GGML_QUANT_SIZES[qtype][0] == 0


def tensor_type(name: str, shape: tuple[int, ...], export_type: str, n_layers: int,
                embeddings_type: GGMLQuantizationType = Q.Q8_0) -> GGMLQuantizationType:
    """The ggml type of one GGUF tensor (`blk.3.attn_v.weight`, shape in HF order [out, in])."""
    main = EXPORT_TYPES[export_type][0]
    if len(shape) < 2 or main == Q.F32 or not name.endswith(".weight") or "ffn_gate_inp" in name:
        return Q.F32  # norms, biases (MoE expert biases are 2-D) and routers: tiny, precision-critical
    wanted = main
    if export_type.endswith("_k_m") and name.startswith("blk."):
        layer = int(name.split(".")[1])
        if name.endswith(("attn_v.weight", "ffn_down.weight")) and _more_bits(layer, n_layers):
            wanted = Q.Q6_K
    if name.startswith(("token_embd", "output.")):
        if export_type.endswith("_k_m"):
            wanted = Q.Q6_K  # llama.cpp's choice for the output tensor of _M mixes
        if _nominal_bits(wanted) < _nominal_bits(embeddings_type):
            wanted = embeddings_type
    row = shape[-1]
    while not _fits(wanted, row):
        wanted = _FALLBACK.get(wanted, Q.F16)  # rows not even a multiple of 32: keep them F16
    return wanted


@cache
def _ggml() -> ctypes.CDLL:
    spec = importlib.util.find_spec("xllamacpp")
    if spec is None or spec.origin is None:
        raise RuntimeError("xllamacpp is not installed")
    library = next(Path(spec.origin).parent.glob("xllamacpp*.so"))
    lib = ctypes.CDLL(str(library))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return lib


def _ggml_quantize(weights: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    weights = np.ascontiguousarray(weights, dtype=np.float32)
    rows, per_row = int(np.prod(weights.shape[:-1])), weights.shape[-1]
    block, size = GGML_QUANT_SIZES[qtype]
    out = np.empty((*weights.shape[:-1], per_row // block * size), dtype=np.uint8)
    written = _ggml().ggml_quantize_chunk(int(qtype), weights.ctypes.data, out.ctypes.data, 0, rows, per_row, None)
    if written != out.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {out.nbytes}")
    return out


def encode(weights: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """The array to hand GGUFWriter.add_tensor (float arrays as they are; uint8 bytes otherwise)."""
    if qtype == Q.F32:
        return np.ascontiguousarray(weights, dtype=np.float32)
    if qtype == Q.F16:
        return np.ascontiguousarray(weights, dtype=np.float16)
    try:
        return gguf_quants.quantize(np.ascontiguousarray(weights, dtype=np.float32), qtype)
    except NotImplementedError:
        return _ggml_quantize(weights, qtype)


def _as_float32(tensor) -> np.ndarray:
    if tensor.tensor_type == Q.F32:
        return np.asarray(tensor.data, dtype=np.float32)
    if tensor.tensor_type == Q.F16:
        return np.asarray(tensor.data).astype(np.float32)
    raise ValueError(f"{tensor.name}: {tensor.tensor_type.name} is not F32/F16 — quantise from the F32 file")


def requantize(source: Path, destination: Path, export_type: str,
               embeddings_type: str = "q8_0") -> tuple[dict[str, int], int, int]:
    """Write `destination` with every tensor of the F32/F16 GGUF `source` at its policy type and
    every metadata key copied (only general.file_type changes); atomically. Returns the tensors
    per ggml type, the number of weights and the bytes of tensor data."""
    reader = GGUFReader(source)
    arch = str(reader.fields["general.architecture"].contents())
    n_layers = int(reader.fields[f"{arch}.block_count"].contents())
    embed_q = EXPORT_TYPES[embeddings_type][0]
    fd, tmp = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".tmp")
    os.close(fd)
    try:
        writer = GGUFWriter(tmp, arch)
        for name, entry in reader.fields.items():
            if name.startswith("GGUF.") or name == "general.architecture":
                continue
            if name == "general.file_type":
                writer.add_file_type(int(EXPORT_TYPES[export_type][1]))
                continue
            kind = entry.types[0]
            writer.add_key_value(name, entry.contents(), kind,
                                 sub_type=entry.types[-1] if kind == GGUFValueType.ARRAY else None)
        counts: Counter = Counter()
        parameters = tensor_bytes = 0
        for tensor in reader.tensors:
            weights = _as_float32(tensor)
            qtype = tensor_type(tensor.name, weights.shape, export_type, n_layers, embed_q)
            data = encode(weights, qtype)
            writer.add_tensor(tensor.name, data, raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)
            counts[qtype.name] += 1
            parameters += weights.size
            tensor_bytes += data.nbytes
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
        os.replace(tmp, destination)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dict(counts), parameters, tensor_bytes
