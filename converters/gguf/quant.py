"""Which GGML type each exported tensor gets, and its bytes, through gguf-py's own quantizer.

The choice follows llama.cpp's `convert_hf_to_gguf.py`: 1-D tensors (norms, biases) and router matrices stay
F32; a row whose length is not a multiple of the type's block falls back to F16; everything else gets the
requested type. Bytes come from `gguf.quants.quantize`, so blocks are bit-identical to gguf-py's.
"""
from __future__ import annotations

import math

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT
from gguf.quants import quantize

# --quant choices -> GGML type: the types gguf-py 0.19 quantizes (the K and IQ types it only dequantizes).
QUANT_TYPES: dict[str, QT] = {"f32": QT.F32, "f16": QT.F16, "bf16": QT.BF16, "q8_0": QT.Q8_0,
                              "q5_1": QT.Q5_1, "q5_0": QT.Q5_0, "q4_1": QT.Q4_1, "q4_0": QT.Q4_0}
# llama.cpp's `general.file_type` (LlamaFileType) for each choice
FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "bf16": 32}
_KEEP_F32 = ("ffn_gate_inp", "ffn_gate_inp_shexp")  # routers: llama.cpp keeps them F32 (tiny, and routing is fragile)


def check_quant(quant: str) -> QT:
    """The GGML type of a `--quant` choice; ValueError (one line naming the supported ones) otherwise."""
    qt = QUANT_TYPES.get(quant.lower())
    if qt is None:
        raise ValueError(f"--quant: '{quant}' is not supported (gguf-py quantizes {', '.join(QUANT_TYPES)}; "
                         "for K-quants such as q4_k_m run llama.cpp's llama-quantize on an f16 export)")
    return qt


def tensor_type(leaf: str, shape: tuple[int, ...], wanted: QT) -> QT:
    """The type llama.cpp's converter would store GGUF leaf `leaf` ([..., row] in numpy order) as."""
    if len(shape) == 1 or leaf in _KEEP_F32 or wanted == QT.F32:
        return QT.F32
    block, _ = GGML_QUANT_SIZES[wanted]
    return wanted if shape[-1] % block == 0 else QT.F16


def tensor_nbytes(shape: tuple[int, ...], qt: QT) -> int:
    """Bytes of a tensor of numpy `shape` stored as `qt`."""
    block, size = GGML_QUANT_SIZES[qt]
    return math.prod(shape[:-1]) * (shape[-1] // block) * size


def encode(w: np.ndarray, qt: QT) -> np.ndarray:
    """`w` (float) as the bytes (or float array) GGUF stores for type `qt`."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    if qt == QT.F32:
        return w
    if qt == QT.F16:
        return w.astype(np.float16)
    return quantize(w, qt)
