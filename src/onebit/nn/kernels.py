"""The packed GEMV kernels: a C++ extension (``packed_gemv.cpp``, built with gcc on first use) for the
layouts in ``KERNEL_LAYOUTS`` (sign, braq, arb/arb-x with or without CGB, arb-rc), and the block tables it
(and the Triton kernel, ``triton_gemv.py``: sign and braq) reads.

The extension reads the checkpoint's own streams (no repacking, so resident memory = storage bytes). Other
methods, and machines where the build fails, use the pure-PyTorch reference path in ``linear.py``.
"""

from __future__ import annotations

import logging
import os
import re
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from ..formats.packed import row_wise

log = logging.getLogger(__name__)

_BRAQ = [["salient_cols", "bits"], ["signs", "bits"], ["signs2", "bits"], ["sparse", "bits"], ["mu", "fp16"],
         ["alpha", "fp16"]]
_ARB_CGB = _BRAQ + [["sal_sparse", "bits"]]
# method → [(kernel layout id, the parameter layout it reads)], with num_p = 1: arb/arb-x without CGB store
# exactly braq's form (methods/arb.py) and run braq's kernel, with CGB braq's plus a salient zone bit;
# arb-rc (CGB by default) its own. Other options change the parameters: the reference path.
KERNEL_LAYOUTS: dict[str, list[tuple[int, list[list[str]]]]] = {
    "sign": [(0, [["signs", "bits"], ["mu", "fp16"], ["alpha", "fp16"]])],
    "braq": [(1, _BRAQ)],
    "arb": [(1, _BRAQ), (3, _ARB_CGB)],
    "arb-x": [(1, _BRAQ), (3, _ARB_CGB)],
    "arb-rc": [(2, [["salient_cols", "bits"], ["signs", "bits"], ["signs2", "bits"], ["sparse", "bits"],
                    ["sal_sparse", "bits"], ["alpha_r", "fp16"], ["alpha_c", "fp16"], ["alpha_c_sal", "fp16"]])],
}
TRITON_LAYOUTS = (0, 1)  # the layouts the CUDA kernel (triton_gemv.py) reads
# the kernels read these parameters in row tiles, the others flat (formats/packed.py: row_wise)
ROW_WISE = ("signs", "signs2", "sparse", "sal_sparse", "mu", "alpha", "alpha_r")
# appended columns keep the first nine where triton_gemv.py reads them
TABLE_COLUMNS = ("start", "width", "k", "signs", "signs2", "sparse", "salient_cols", "mu", "alpha", "sal_sparse",
                 "alpha_r", "alpha_c", "alpha_c_sal")


@lru_cache(maxsize=1)
def extension() -> ModuleType | None:
    """The compiled extension, or None (logged once) when it cannot be built here. ``ONEBIT_NO_EXT=1``: none
    (the reference path); ``ONEBIT_KERNEL_MARCH``: gcc's ``-march`` (default ``native``; e.g. ``x86-64-v3``
    measures what AVX2 CPUs get)."""
    if os.environ.get("ONEBIT_NO_EXT"):
        return None
    try:
        return build(os.environ.get("ONEBIT_KERNEL_MARCH", "native"))
    except Exception as e:  # noqa: BLE001 - any build failure means: use the reference path
        log.warning("onebit packed-GEMV extension unavailable (%s); using the PyTorch reference path", e)
        return None


@lru_cache(maxsize=1)
def triton_available() -> bool:
    """Triton importable (the CUDA packed kernel, ``triton_gemv.py``); else CUDA runs the dense path."""
    import importlib.util

    return not os.environ.get("ONEBIT_NO_EXT") and importlib.util.find_spec("triton") is not None


def build(march: str = "native") -> ModuleType:
    """Compile (or load the cached build of) the extension for gcc's ``-march``; below AVX-512 (e.g.
    ``x86-64-v2``, what the tests build to check the path machines without AVX-512 run) the kernel uses
    GCC vector extensions instead of AVX-512 intrinsics."""
    from torch.utils.cpp_extension import load

    src = Path(__file__).with_name("packed_gemv.cpp")
    arch = f"-march={march}"
    name = "onebit_packed_gemv" + ("" if march == "native" else "_" + re.sub(r"\W", "_", march))
    return load(name, [str(src)], extra_cflags=["-O3", arch, "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)


def kernel_layout(method: str, layout: list[list[str]], index: Tensor, out_features: int) -> int | None:
    """The kernel layout id for a method's parameter layout (its parameters in any order), or None (reference
    path). Also None where the format's row-tile rule disagrees with the kernel: a per-column tensor whose
    first dimension happens to equal out_features is stored in row tiles (e.g. arb-rc's 2 × w ``alpha_c``
    of a 2-row linear)."""
    # any parameter order: ``block_table`` locates every parameter by name
    want = sorted(map(tuple, layout))
    lid = next((i for i, params in KERNEL_LAYOUTS.get(method, []) if sorted(map(tuple, params)) == want), None)
    if lid is None:
        return None
    for p, (name, _) in enumerate(layout):
        ndim, d0, d1 = index[0, p].tolist()
        if row_wise((d0, d1)[:ndim], out_features) != (name in ROW_WISE):
            return None
    return lid


def block_table(index: Tensor, layout: list[list[str]], block_size: int, in_features: int) -> Tensor:
    """int64 (blocks, 9): each block's start, width, salient count and the stream offset of every parameter."""
    names = [n for n, _ in layout]
    table = torch.zeros(index.shape[0], len(TABLE_COLUMNS), dtype=torch.int64)
    bit_off = fp_off = 0
    for j, shapes in enumerate(index.tolist()):
        start = j * block_size
        table[j, 0], table[j, 1] = start, min(block_size, in_features - start)
        for (name, kind), (_, d0, d1) in zip(layout, shapes):
            col = TABLE_COLUMNS.index(name)
            if kind == "bits":
                table[j, col] = bit_off
                bit_off += d0 * d1
            else:
                table[j, col] = fp_off
                fp_off += d0 * d1
        if "signs2" in names:
            table[j, 2] = shapes[names.index("signs2")][2]
    return table


def packed_gemm(x: Tensor, bits: Tensor, fp16: Tensor, table: Tensor, out_features: int, layout: int) -> Tensor:
    """y (tokens, out) = x (tokens, in) · Ŵᵀ computed from the packed streams (fp32 in and out)."""
    ext = extension()
    if ext is None:
        raise RuntimeError("packed-GEMV extension not available")
    return ext.packed_gemm(x.contiguous(), bits, fp16, table, out_features, layout)
