"""Batched paged decode attention for the CPU: a small C++ kernel, built on first use, behind a torch op.

The inductor-compiled kernel (``cpu_attention.paged_decode_attention``) must keep its shapes static, so
every row of a batch spans the batch's widest block table (masked), and it reduces each key's scores
across vector lanes. This kernel walks each row's own blocks only (a task per row, or per row and KV
head where rows are few), with an online softmax per block: the query heads of a group share each key
and value load, scores are exponentiated a block at a time in vector code, and the tasks are spread over
torch's threads dynamically, longest first (rows differ in length). It computes in fp32 whatever the cache's dtype (fp32 or bf16).

The op (``lmwrap::paged_decode_cpu``) is registered from Python (``torch.library.Library``) and calls the
extension through pybind: a compiled decode program saved to disk names the op, and a later process that
imports this module finds it again (an op registered from C++ was not found when such a program was
loaded, and every start recompiled). The extension is built with ``torch.utils.cpp_extension`` (the C++
compiler inductor uses too) into torch's extensions folder, once per source version and instruction set
(its name carries both, so a cache folder shared by machines of different widths never mixes them).
``LMWRAP_CPU_ATTENTION=compiled`` keeps the inductor kernel; ``reference`` sends eager steps to the torch
reference (a compiled program then traces inductor's kernel).
"""
from __future__ import annotations

import glob
import hashlib
import logging
import os
import time
from functools import lru_cache
from typing import Optional

import torch

logger = logging.getLogger("lmwrap_engine")

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <omp.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const at::BFloat16* p, int64_t i) {
  return bits_to_float(uint32_t(reinterpret_cast<const uint16_t*>(p)[i]) << 16);
}
inline void store(float* p, int64_t i, float x) { p[i] = x; }
inline void store(at::BFloat16* p, int64_t i, float x) { p[i] = at::BFloat16(x); }

// exp(x) for x <= 0 (scores minus their running maximum), branch-free so that loops over it vectorise:
// 2^(x log2 e) split into an integer power and a degree-6 polynomial on [0, 1); relative error ~2e-7.
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float t = x * 1.44269504088896341f;
  const float whole = std::floor(t);
  const float f = t - whole;
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  return p * bits_to_float(uint32_t(int32_t(whole) + 127) << 23);
}

using vec8 = __m256;  // AVX2 (every CPU whose torch kernels run avx2 or avx512 has it, and FMA)

inline vec8 load8(const float* p) { return _mm256_loadu_ps(p); }
inline vec8 load8(const at::BFloat16* p) {
  const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}

// The eight sums of a[0..7]'s lanes, in order.
inline vec8 sum_lanes8(const vec8* a) {
  const vec8 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const vec8 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// One (row, KV head) task: the row's `group` query heads over its own blocks, online softmax per block.
// head_dim is a multiple of 8 (paged_decode checks); scores holds `group` rows of score_stride (block_size
// rounded up to 8) floats.
template <typename Q, typename T>
void attend(const Q* q, const T* k_cache, const T* v_cache, const int64_t* table, int64_t len, Q* out,
            int64_t group, int64_t head_dim, int64_t block_size, int64_t key_stride, float scale,
            float* qs, float* acc, float* scores, float* maxes, float* totals) {
  const int64_t score_stride = (block_size + 7) / 8 * 8;
  const int64_t chunks = head_dim / 8;
  for (int64_t g = 0; g < group; ++g) {
    for (int64_t d = 0; d < head_dim; ++d) qs[g * head_dim + d] = load(q, g * head_dim + d) * scale;
    maxes[g] = -std::numeric_limits<float>::infinity();
    totals[g] = 0.0f;
  }
  std::fill(acc, acc + group * head_dim, 0.0f);
  const int64_t num_blocks = (len + block_size - 1) / block_size;
  for (int64_t j = 0; j < num_blocks; ++j) {
    const int64_t n = std::min(block_size, len - j * block_size);
    const T* block_k = k_cache + table[j] * block_size * key_stride;  // key 0 of this block, this KV head
    const T* block_v = v_cache + table[j] * block_size * key_stride;
    // Scores, eight keys at a time (eight independent sums; past n, key n - 1 again, never used).
    for (int64_t t = 0; t < n; t += 8) {
      const T* keys[8];
      for (int i = 0; i < 8; ++i) keys[i] = block_k + std::min(t + i, n - 1) * key_stride;
      for (int64_t g = 0; g < group; ++g) {
        const float* qg = qs + g * head_dim;
        vec8 a[8];
        for (int i = 0; i < 8; ++i) a[i] = _mm256_setzero_ps();
        for (int64_t c = 0; c < chunks; ++c) {
          const vec8 qc = _mm256_loadu_ps(qg + 8 * c);
          for (int i = 0; i < 8; ++i) a[i] = _mm256_fmadd_ps(qc, load8(keys[i] + 8 * c), a[i]);
        }
        _mm256_storeu_ps(scores + g * score_stride + t, sum_lanes8(a));
      }
    }
    for (int64_t g = 0; g < group; ++g) {
      float* s = scores + g * score_stride;
      float top = maxes[g];
      for (int64_t t = 0; t < n; ++t) top = s[t] > top ? s[t] : top;
      const float rescale = j == 0 ? 0.0f : exp_nonpositive(maxes[g] - top);
      float sum = 0.0f;
      #pragma omp simd reduction(+:sum)
      for (int64_t t = 0; t < n; ++t) {
        const float p = exp_nonpositive(s[t] - top);
        s[t] = p;
        sum += p;
      }
      totals[g] = totals[g] * rescale + sum;
      maxes[g] = top;
      // Weighted values, eight dims at a time, the head's sums in registers over the block's keys.
      for (int64_t c0 = 0; c0 < chunks; c0 += 8) {
        const int64_t width = std::min<int64_t>(8, chunks - c0);
        vec8 a[8];
        const vec8 r = _mm256_set1_ps(rescale);
        for (int i = 0; i < width; ++i) a[i] = _mm256_mul_ps(_mm256_loadu_ps(acc + g * head_dim + 8 * (c0 + i)), r);
        for (int64_t t = 0; t < n; ++t) {
          const vec8 p = _mm256_set1_ps(s[t]);
          const T* vp = block_v + t * key_stride + 8 * c0;
          for (int i = 0; i < width; ++i) a[i] = _mm256_fmadd_ps(p, load8(vp + 8 * i), a[i]);
        }
        for (int i = 0; i < width; ++i) _mm256_storeu_ps(acc + g * head_dim + 8 * (c0 + i), a[i]);
      }
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    const float inv = totals[g] > 0.0f ? 1.0f / totals[g] : 0.0f;  // a row with no keys gets zeros
    for (int64_t d = 0; d < head_dim; ++d) store(out, g * head_dim + d, acc[g * head_dim + d] * inv);
  }
}

template <typename Q, typename T>
void run(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& tables,
         const at::Tensor& lens, at::Tensor& out, float scale) {
  const int64_t batch = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  const int64_t group = num_heads / num_kv_heads, width = tables.size(1);
  const int64_t key_stride = num_kv_heads * head_dim;
  const Q* qp = q.data_ptr<Q>();
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  Q* op = out.data_ptr<Q>();
  // A task is a row's KV heads, one after another (the row's keys stay in L2 for the next head, so memory is
  // read in whole lines, in order), or one (row, KV head) pair where the rows are too few to keep every
  // thread busy. Longest rows first, handed out one at a time: rows differ in length.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t heads_per_task = batch >= 4 * threads ? num_kv_heads : 1;
  const int64_t tasks = batch * num_kv_heads / heads_per_task;
  std::vector<int64_t> order(tasks);
  for (int64_t i = 0; i < tasks; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return lp[a * heads_per_task / num_kv_heads] > lp[b * heads_per_task / num_kv_heads];
  });
  #pragma omp parallel num_threads(static_cast<int>(std::min(threads, tasks)))
  {
    std::vector<float> buffer(group * (2 * head_dim + (block_size + 7) / 8 * 8 + 2));
    float* qs = buffer.data();
    float* acc = qs + group * head_dim;
    float* scores = acc + group * head_dim;
    float* maxes = scores + group * ((block_size + 7) / 8 * 8);
    float* totals = maxes + group;
    #pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < tasks; ++i) {
      const int64_t first_head = order[i] * heads_per_task;
      const int64_t row = first_head / num_kv_heads;
      const int64_t len = std::max<int64_t>(lp[row], 0);
      for (int64_t h = first_head % num_kv_heads; h < first_head % num_kv_heads + heads_per_task; ++h) {
        attend(qp + (row * num_heads + h * group) * head_dim, kp + h * head_dim, vp + h * head_dim,
               tp + row * width, len, op + (row * num_heads + h * group) * head_dim, group, head_dim,
               block_size, key_stride, scale, qs, acc, scores, maxes, totals);
      }
    }
  }
}

}  // namespace

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& block_tables, const at::Tensor& kv_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "q [B, H, D], caches [N, S, Hk, D]");
  TORCH_CHECK(q.size(2) == k_cache.size(3) && q.size(1) % k_cache.size(2) == 0, "head dims / head groups differ");
  TORCH_CHECK(q.size(2) % 8 == 0, "head_dim: a multiple of 8");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.scalar_type() == v_cache.scalar_type(),
              "caches: contiguous, one dtype");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == q.size(0) && kv_lens.numel() == q.size(0),
              "block_tables [B, W], kv_lens [B]");
  const auto qc = q.contiguous();
  if (qc.size(0) == 0) return at::empty_like(qc);
  const auto tables = block_tables.to(at::kLong).contiguous();
  const auto lens = kv_lens.to(at::kLong).contiguous();
  TORCH_CHECK(lens.numel() == 0 || lens.max().item<int64_t>() <= tables.size(1) * k_cache.size(1),
              "a row is longer than its block table");
  auto out = at::empty_like(qc);
  const float s = static_cast<float>(scale);
  const bool bf16_cache = k_cache.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf16_cache || k_cache.scalar_type() == at::kFloat, "cache dtype: float32 or bfloat16");
  if (q.scalar_type() == at::kFloat) {
    if (bf16_cache) run<float, at::BFloat16>(qc, k_cache, v_cache, tables, lens, out, s);
    else run<float, float>(qc, k_cache, v_cache, tables, lens, out, s);
  } else {
    TORCH_CHECK(q.scalar_type() == at::kBFloat16, "q dtype: float32 or bfloat16");
    if (bf16_cache) run<at::BFloat16, at::BFloat16>(qc, k_cache, v_cache, tables, lens, out, s);
    else run<at::BFloat16, float>(qc, k_cache, v_cache, tables, lens, out, s);
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "paged decode attention (fp32 compute)");
}
"""

# Compiler flags per instruction set torch dispatches to (the generated code follows the same set).
_ISA_FLAGS = {"avx2": ["-mavx2", "-mfma", "-mf16c"],
              "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"]}


# Read once (a trace cannot call it): torch picks its kernels' instruction set once per process.
_ISA = torch.backends.cpu.get_cpu_capability().lower()
_built: Optional[bool] = None  # whether the extension built: available()'s memo, plain data for a trace


@lru_cache(maxsize=1)
def _extension():
    """The built module, or ``None`` (with one warning) where it cannot be built."""
    isa = _ISA
    try:
        from torch.utils import cpp_extension
        name = f"lmwrap_paged_decode_{isa}_" + hashlib.sha256(SOURCE.encode()).hexdigest()[:12]
        folder = cpp_extension._get_build_directory(name, verbose=False)
        if not glob.glob(os.path.join(folder, "*.so")):
            logger.info("building the CPU paged-attention kernel into %s (once, about 30 s)", folder)
        _drop_stale_lock(os.path.join(folder, "lock"))
        # -fopenmp: the parallel loop; the libgomp it links is the one torch loaded, so it shares its threads.
        return cpp_extension.load_inline(name, cpp_sources=SOURCE, verbose=False,
                                         extra_cflags=["-O3", "-fopenmp", *_ISA_FLAGS.get(isa, [])],
                                         extra_ldflags=["-fopenmp"])
    except Exception as exc:  # no compiler, a failed build
        logger.warning("building the CPU paged-attention kernel failed (%s: %s); using the compiled torch kernel",
                       type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        return None


def _drop_stale_lock(path: str, max_age_s: float = 600) -> None:
    """torch's build lock outlives a build that was killed, and every later build waits on it forever: one
    older than any build takes is removed."""
    try:
        if time.time() - os.path.getmtime(path) > max_age_s:
            os.remove(path)
            logger.warning("removed a stale build lock %s (a build killed midway)", path)
    except OSError:
        pass


def available() -> bool:
    """Whether the kernel serves CPU decode attention: wanted (``LMWRAP_CPU_ATTENTION`` unset or ``kernel``),
    an x86 CPU whose torch kernels run AVX2 or AVX-512, and built (the first call builds it; the engine calls
    it at start-up, so that a trace only reads the answer)."""
    global _built
    if os.environ.get("LMWRAP_CPU_ATTENTION", "kernel") != "kernel" or _ISA not in _ISA_FLAGS:
        return False
    if _built is None:
        _built = _extension() is not None
    return _built


def supports(k_cache: torch.Tensor) -> bool:
    """Whether :func:`paged_decode_attention` serves this cache: on the CPU, fp32 or bf16, a head dim that is a
    multiple of 8, and :func:`available`."""
    return (k_cache.device.type == "cpu" and k_cache.dtype in (torch.float32, torch.bfloat16)
            and k_cache.shape[3] % 8 == 0 and available())


def _paged_decode_cpu(q, k_cache, v_cache, block_tables, kv_lens, scale):
    return _extension().paged_decode(q, k_cache, v_cache, block_tables, kv_lens, scale)


def _fake(q, k_cache, v_cache, block_tables, kv_lens, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


# Registered once per process, as in cpu_kv_cache.py (a Library: the dispatcher calls the Python kernel
# directly, without torch.library.custom_op's wrapper).
if not hasattr(torch.ops.lmwrap, "paged_decode_cpu"):
    _lib = torch.library.Library("lmwrap", "FRAGMENT")
    _lib.define("paged_decode_cpu(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor kv_lens, "
                "float scale) -> Tensor")
    _lib.impl("paged_decode_cpu", _paged_decode_cpu, "CompositeExplicitAutograd")
    torch.library.register_fake("lmwrap::paged_decode_cpu", _fake, lib=_lib)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, kv_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """``q [B, H, D]`` (fp32 or bf16) attends each row's first ``kv_lens[b]`` cached keys (fp32 or bf16 caches
    ``[N, S, Hk, D]``, blocks ``block_tables [B, W]``) -> ``[B, H, D]`` in q's dtype; a row with no keys gets
    zeros. Call :func:`supports` first."""
    return torch.ops.lmwrap.paged_decode_cpu(q, k_cache, v_cache, block_tables, kv_lens, scale)
