"""4-bit matrix-vector products for CPUs whose torch kernels run AVX2: a small C++ op built on first use.

On AVX2 code torch's ``_weight_int4pack_mm_for_cpu`` is compute-bound at a few rows (8-lane fp32 work
per nibble, bf16 activations): on a 2-core Xeon limited to AVX2 (``ATEN_CPU_CAPABILITY=avx2``) SmolLM2-135M's
120 4-bit layers took 7.7-8.2 ms a token, this op 5.5-6.0 (weights from memory, in huge pages; 3.5-4.0
against 6.6-8.0 ms with the weights in cache). It computes ``y = x @ (q * d + m).T`` in fp32 throughout:
fp32 activations (not rounded to bf16) and the file's fp16 ``d``, ``m`` in fp32, so its error is float rounding
(~1e-6 relative, torch's kernel with bf16 activations ~3e-3). Where torch's kernels run AVX-512 theirs is
as fast or faster, so the engine uses this op only on AVX2 (``quant_linear.py``).

Layout (:func:`pack`): output features in tiles of 32; for each tile and input feature ``k`` four 32-bit
words, nibble ``j`` of word ``b`` holding ``q[32 t + 8 b + j, k]``, so one broadcast word, a variable
shift and a mask give eight features' ``q`` in eight fp32 lanes. ``d`` and ``m`` per tile and group of 32
along ``k``, 32 values each: ``d`` fp16 (a GGUF file's), ``m`` fp32 (a Q4_0 group read as ``m + d q`` with
``d < 0`` has ``m = 7 |d|``, not always an fp16 value); kept as int16 / int32 so that ``module.to(dtype)``
leaves them alone.

The op is registered from C++ (``lmwrap_int4::gemv``), so a compiled step calls it without a trip
through Python; it is built with ``torch.utils.cpp_extension`` (the C++ compiler inductor uses too) into
torch's extensions folder (``TORCH_EXTENSIONS_DIR``), once per source version.
"""
from __future__ import annotations

import glob
import logging
import os
import time
from functools import lru_cache
from typing import Tuple

import torch

logger = logging.getLogger("lmwrap_engine")

TILE = 32
GROUP = 32

SOURCE = r"""
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

// built with -fopenmp (load()): at::parallel_for runs serially without it

// y[r, n] = sum_k x[r, k] * (q[n, k] * d[n, k / 32] + m[n, k / 32]); layout: kernels/cpu_int4_gemv.py
static at::Tensor gemv(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                       const at::Tensor& mins) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous fp32 [M, K]");
  TORCH_CHECK(packed.dim() == 3 && packed.size(1) == x.size(1) && packed.size(2) == 4 && packed.is_contiguous(),
              "packed: [N / 32, K, 4]");
  const int64_t rows = x.size(0), K = x.size(1), tiles = packed.size(0), groups = K / 32;
  TORCH_CHECK(K % 32 == 0 && scales.numel() == tiles * groups * 32 && mins.numel() == scales.numel() &&
              scales.scalar_type() == at::kShort && mins.scalar_type() == at::kInt, "scales, mins: [N / 32, K / 32, 32]");
  auto out = at::empty({rows, tiles * 32}, x.options());
  auto sums = at::empty({rows, groups}, x.options());  // x summed per group: the m term
  const float* xp = x.data_ptr<float>();
  float* sp = sums.data_ptr<float>();
  for (int64_t i = 0; i < rows * groups; ++i) {
    float s = 0.f;
    for (int j = 0; j < 32; ++j) s += xp[i * 32 + j];
    sp[i] = s;
  }
  const uint32_t* wp = reinterpret_cast<const uint32_t*>(packed.data_ptr<int32_t>());
  const __m128i* dp = reinterpret_cast<const __m128i*>(scales.data_ptr<int16_t>());
  const float* mp = reinterpret_cast<const float*>(mins.data_ptr<int32_t>());
  float* op = out.data_ptr<float>();
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    const __m256i mask = _mm256_set1_epi32(15);
    for (int64_t t = begin; t < end; ++t) {
      const uint32_t* w = wp + t * K * 4;
      for (int64_t r = 0; r < rows; ++r) {  // the tile stays in cache for the next row
        const float* xr = xp + r * K;
        __m256 y0 = _mm256_setzero_ps(), y1 = y0, y2 = y0, y3 = y0;
        for (int64_t g = 0; g < groups; ++g) {
          __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
          for (int64_t k = g * 32; k < g * 32 + 32; ++k) {
            const __m256 xk = _mm256_broadcast_ss(xr + k);
            const uint32_t* wk = w + k * 4;
            a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(
                _mm256_srlv_epi32(_mm256_set1_epi32(wk[0]), shifts), mask)), xk, a0);
            a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(
                _mm256_srlv_epi32(_mm256_set1_epi32(wk[1]), shifts), mask)), xk, a1);
            a2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(
                _mm256_srlv_epi32(_mm256_set1_epi32(wk[2]), shifts), mask)), xk, a2);
            a3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(
                _mm256_srlv_epi32(_mm256_set1_epi32(wk[3]), shifts), mask)), xk, a3);
          }
          const __m128i* d = dp + (t * groups + g) * 4;
          const float* m = mp + (t * groups + g) * 32;
          const __m256 s = _mm256_set1_ps(sp[r * groups + g]);
          y0 = _mm256_fmadd_ps(_mm256_loadu_ps(m), s,
                               _mm256_fmadd_ps(a0, _mm256_cvtph_ps(_mm_loadu_si128(d + 0)), y0));
          y1 = _mm256_fmadd_ps(_mm256_loadu_ps(m + 8), s,
                               _mm256_fmadd_ps(a1, _mm256_cvtph_ps(_mm_loadu_si128(d + 1)), y1));
          y2 = _mm256_fmadd_ps(_mm256_loadu_ps(m + 16), s,
                               _mm256_fmadd_ps(a2, _mm256_cvtph_ps(_mm_loadu_si128(d + 2)), y2));
          y3 = _mm256_fmadd_ps(_mm256_loadu_ps(m + 24), s,
                               _mm256_fmadd_ps(a3, _mm256_cvtph_ps(_mm_loadu_si128(d + 3)), y3));
        }
        float* o = op + r * tiles * 32 + t * 32;
        _mm256_storeu_ps(o, y0); _mm256_storeu_ps(o + 8, y1); _mm256_storeu_ps(o + 16, y2); _mm256_storeu_ps(o + 24, y3);
      }
    }
  });
  return out;
}

TORCH_LIBRARY(lmwrap_int4, m) {
  m.def("gemv(Tensor x, Tensor packed, Tensor scales, Tensor mins) -> Tensor");
}

TORCH_LIBRARY_IMPL(lmwrap_int4, CPU, m) {
  m.impl("gemv", &gemv);
}
"""


def cpu_supports() -> bool:
    """The CPU has the instructions the op is compiled for: torch dispatches AVX2 (or AVX-512) kernels only
    on a CPU with AVX2 and FMA, and every such x86 CPU has F16C."""
    return torch.backends.cpu.get_cpu_capability().lower() in ("avx2", "avx512")


@lru_cache(maxsize=1)
def load() -> bool:
    """Builds (first time, about 30 s on 2 cores) or loads the op; ``False`` (with a warning) where it cannot."""
    if not cpu_supports():
        return False
    try:
        import hashlib
        from torch.utils import cpp_extension
        name = "lmwrap_int4_" + hashlib.sha256(SOURCE.encode()).hexdigest()[:12]
        folder = cpp_extension._get_build_directory(name, verbose=False)
        if not glob.glob(os.path.join(folder, "*.so")):
            logger.info("building the AVX2 4-bit kernel into %s (once, about 30 s)", folder)
        _drop_stale_lock(os.path.join(folder, "lock"))
        # -fopenmp: at::parallel_for is inline and serial without it; the libgomp it links is the one torch
        # loaded (the same soname), so the op shares torch's threads.
        cpp_extension.load_inline(name, cpp_sources=SOURCE, is_python_module=False, verbose=False,
                                  extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"],
                                  extra_ldflags=["-fopenmp"])
    except Exception as exc:  # no compiler, a failed build
        logger.warning("building the AVX2 4-bit kernel failed (%s: %s); using torch's", type(exc).__name__,
                       str(exc).splitlines()[0] if str(exc) else "")
        return False
    if not hasattr(torch.ops.lmwrap_int4.gemv, "_lmwrap_fake"):
        @torch.library.register_fake("lmwrap_int4::gemv")
        def _fake(x, packed, scales, mins):
            return x.new_empty((x.shape[0], packed.shape[0] * TILE))
        torch.ops.lmwrap_int4.gemv._lmwrap_fake = True
    return True


def _drop_stale_lock(path: str, max_age_s: float = 600) -> None:
    """torch's build lock outlives a build that was killed, and every later build waits on it forever: one
    older than any build takes is removed."""
    try:
        if time.time() - os.path.getmtime(path) > max_age_s:
            os.remove(path)
            logger.warning("removed a stale build lock %s (a build killed midway)", path)
    except OSError:
        pass


def pack(q: torch.Tensor, step: torch.Tensor, minimum: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q [N, K]`` (0..15), ``step``, ``minimum [N, K/32]`` -> ``(packed [N/32, K, 4] int32, scales [N/32, K/32,
    32] fp16 stored as int16, mins [N/32, K/32, 32] fp32 stored as int32)``; ``N`` and ``K`` multiples of 32."""
    n, k = q.shape
    assert n % TILE == 0 and k % GROUP == 0, (n, k)
    nibbles = q.to(torch.int64).view(n // TILE, 4, 8, k).permute(0, 3, 1, 2)   # [N/32, K, 4, 8]
    words = (nibbles << (4 * torch.arange(8))).sum(-1)                         # < 2**32
    packed = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()

    def per_tile(v: torch.Tensor, dtype: torch.dtype, stored: torch.dtype) -> torch.Tensor:
        return v.to(dtype).view(n // TILE, TILE, k // GROUP).transpose(1, 2).contiguous().view(stored)
    return packed, per_tile(step, torch.float16, torch.int16), per_tile(minimum, torch.float32, torch.int32)


def gemv(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """``x [M, K]`` (fp32, contiguous) times the packed weight -> ``[M, N]`` fp32 (after :func:`load`)."""
    return torch.ops.lmwrap_int4.gemv(x, packed, scales, mins)


def reference(x: torch.Tensor, q: torch.Tensor, step: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    """What :func:`gemv` computes, in plain torch (fp32)."""
    weight = q.float() * step.float().repeat_interleave(GROUP, 1) + minimum.float().repeat_interleave(GROUP, 1)
    return x.float() @ weight.T
