"""The CPU kernel of the sparse gated FFN: a small C++/OpenMP extension, compiled once and cached.

Why a compiled kernel (measured on the 2-core AMD EPYC of this project, DETR-R50 encoder block: 850 tokens,
d 256, H 2048, G 16, 90 % of the (token, group) pairs closed, 1 torch thread; medians):
- dense fc1/fc2 (MKL) 25 ms; masked dense 28 ms;
- PyTorch MoE-style dispatch (sort the open (token, group) pairs by group, gather the tokens,
  `torch._grouped_mm` over groups, index_add back) 13.9 ms, of which 3.4 ms gather, 4.0 + 2.9 ms the two
  grouped matmuls, 1.1 ms index_add: moving the gathered copies through memory costs as much as the math;
- padded batched matmuls (torch.bmm over groups, padded to the busiest group) 27.8 ms;
- a compiled kernel about 4x faster than dense at 2 threads (10.6 ms against 46 ms on the loaded machine).
The kernel never materialises the gathered tokens: each thread takes a tile of tokens; per group it lists the
tile's tokens that open it (a counting sort over the mask rows, eight flags per word) and runs them in chunks of
up to 8, so that the group's weights (fc1 and fc2 in one contiguous block) stay in L1:
- fc1: per k step one load of the group's G weights feeds every token of the chunk (register-held
  accumulators, two partial sums per token, so that a chunk of one token still keeps two FMA chains busy);
- fc2: per token, over its own nonzero hidden values only (ReLU zeros add nothing, and on a trained DETR they are
  most of an open group's values), with the output row held in registers (16 vectors on AVX-512, d 256 whole):
  each chunk of y is loaded and stored once per group, not once per hidden value.
The kernel before it (kept in benchmarks/kernel_v2.py as the baseline) did fc2 as one rank-1 update per nonzero
hidden value, `y[token, 0:d] += h * W2t[n, 0:d]`, loading and storing the token's output row each time, and
branched per hidden value and per (token, group) flag. Measured in one run on identical masks (the study's trained
gates' and random ones; R50 shapes and the study's own blocks on real activations; AVX-512 class): see the README's
"Speed" section and `kernel_v2.json`. (Fusing fc2 with register-held output chunks over a compacted list of
nonzero hidden values *across* tokens measured slower, 1.5x against 4.4x, and was dropped; so was fc2 blocked over
4 tokens and all G hidden values of a group, which pays for ReLU's zeros.)

The build goes through `torch.utils.cpp_extension.load_inline`, which caches the compiled module under
TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions), in a directory named after the extension; a second
process loads it in well under a second. torch keys that cache by the source and the compile flags only, and
`-march=native` reads the same on every machine, so a build cached in a home directory shared by a cluster's
nodes would be loaded on a CPU without the instructions it was compiled for (an illegal-instruction crash).
The extension's name therefore carries the machine: torch's CPU capability (`avx512`, `avx2`, ...) and a short
hash of the compile flags and the CPU's instruction-set flags (`build_key`), so each kind of CPU gets, and only
ever loads, its own build. Without a compiler (or ninja) the build fails once, is logged, and callers fall
back to the PyTorch dispatch path.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import re
from functools import lru_cache
from pathlib import Path


log = logging.getLogger(__name__)

EXTENSION_NAME = "detr_sparsity_gated_ffn_v2"
CFLAGS = ("-O3", "-march=native", "-fopenmp")
LDFLAGS = ("-fopenmp",)

SOURCE = r"""
#include <torch/extension.h>
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX__)
#include <immintrin.h>
#endif

// Vector width and register budget of the instruction set this module is compiled for (-march=native).
#if defined(__AVX512F__)
constexpr int W = 16;    // floats per vector
constexpr int ACC = 16;  // fc1: accumulator vectors of one chunk of tokens (of 32 registers)
constexpr int YC = 16;   // fc2: vectors of one output row held in registers (d 256 whole)
#elif defined(__AVX__)
constexpr int W = 8;
constexpr int ACC = 8;   // of 16 registers
constexpr int YC = 8;
#else
constexpr int W = 4;
constexpr int ACC = 8;
constexpr int YC = 8;
#endif
// fc1: at most 8 tokens per chunk, and up to 2 partial sums over k per token, so that even a chunk of one token
// keeps more than one FMA chain in flight (tokens per chunk and partial sums measured by benchmarks/kernel_v2.py).
constexpr int NTMAX = 8, PMAX = 2;

template <int V> struct Vec;
template <> struct Vec<4> {
  typedef float type __attribute__((vector_size(16)));
  typedef float unaligned __attribute__((vector_size(16), aligned(4)));
};
template <> struct Vec<8> {
  typedef float type __attribute__((vector_size(32)));
  typedef float unaligned __attribute__((vector_size(32), aligned(4)));
};
template <> struct Vec<16> {
  typedef float type __attribute__((vector_size(64)));
  typedef float unaligned __attribute__((vector_size(64), aligned(4)));
};
template <int V> static inline typename Vec<V>::type vload(const float* p) {
  return *(const typename Vec<V>::unaligned*)p;
}
template <int V> static inline void vstore(float* p, typename Vec<V>::type v) {
  *(typename Vec<V>::unaligned*)p = v;
}
// Bit i set where lane i of v is above zero: one compare on AVX-512 and AVX, a loop elsewhere.
template <int V> static inline uint64_t positive_lanes(typename Vec<V>::type v) {
#if defined(__AVX512F__)
  if constexpr (V == 16) return _mm512_cmp_ps_mask((__m512)v, _mm512_setzero_ps(), _CMP_GT_OQ);
#endif
#if defined(__AVX__)
  if constexpr (V == 8) return (uint64_t)_mm256_movemask_ps(_mm256_cmp_ps((__m256)v, _mm256_setzero_ps(), _CMP_GT_OQ));
#endif
  uint64_t bits = 0;
  for (int i = 0; i < V; ++i) bits |= (uint64_t)(v[i] > 0.f) << i;
  return bits;
}

// A group's G fc1 outputs as GV vectors of V floats; fc1 takes NT tokens per chunk, each summed over k in P
// partial sums (P x NT x GV accumulators). Both depend on G and the instruction set only, never on the chunk: a
// token's sums run in the same order whichever chunk, tile or thread count computes it.
template <int G> struct Shape {
  static constexpr int V = G < W ? G : W;
  static constexpr int GV = G / V;
  static constexpr int NT = std::max(1, std::min(NTMAX, ACC / GV));
  static constexpr int P = std::max(1, std::min(PMAX, ACC / (GV * NT)));
};

// h[r][0:G] = relu(b1 + W1g^T x_r) for the N tokens of a chunk: per k step one load of the group's G weights
// feeds N x GV independent FMA chains held in registers (P x N x GV with the partial sums, added in a fixed order).
template <int G, int N>
static inline void fc1_chunk(const float* const* xr, const float* w1, const float* b1, float (*h)[G], uint64_t* nonzero,
                             int64_t d) {
  constexpr int V = Shape<G>::V, GV = Shape<G>::GV, P = Shape<G>::P;
  typedef typename Vec<V>::type v_t;
  v_t acc[P][N][GV];
#pragma GCC unroll 16
  for (int r = 0; r < N; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < GV; ++v) {
      acc[0][r][v] = vload<V>(b1 + v * V);
#pragma GCC unroll 4
      for (int p = 1; p < P; ++p) acc[p][r][v] = v_t{};
    }
  int64_t k = 0;
  for (; k + P <= d; k += P) {
#pragma GCC unroll 4
    for (int p = 0; p < P; ++p) {
      v_t w[GV];
#pragma GCC unroll 16
      for (int v = 0; v < GV; ++v) w[v] = vload<V>(w1 + (k + p) * G + v * V);
#pragma GCC unroll 16
      for (int r = 0; r < N; ++r) {
        const float a = xr[r][k + p];
#pragma GCC unroll 16
        for (int v = 0; v < GV; ++v) acc[p][r][v] += a * w[v];
      }
    }
  }
  for (; k < d; ++k) {
    v_t w[GV];
#pragma GCC unroll 16
    for (int v = 0; v < GV; ++v) w[v] = vload<V>(w1 + k * G + v * V);
#pragma GCC unroll 16
    for (int r = 0; r < N; ++r) {
      const float a = xr[r][k];
#pragma GCC unroll 16
      for (int v = 0; v < GV; ++v) acc[0][r][v] += a * w[v];
    }
  }
  const v_t zero = {};
#pragma GCC unroll 16
  for (int r = 0; r < N; ++r) {
    nonzero[r] = 0;
#pragma GCC unroll 16
    for (int v = 0; v < GV; ++v) {
      v_t sum = acc[0][r][v];
#pragma GCC unroll 4
      for (int p = 1; p < P; ++p) sum += acc[p][r][v];
      vstore<V>(h[r] + v * V, sum > zero ? sum : zero);
      nonzero[r] |= positive_lanes<V>(sum) << (v * V);
    }
  }
}

// y[c, c + C W) += sum over the nonzero hidden values h[nz[k]] of h[nz[k]] * w2[nz[k], c, c + C W), in chunks
// of C vectors held in registers: each chunk of y loaded and stored once per group. Returns where it stopped.
template <int C>
static inline int64_t fc2_row(const float* h, const int* nz, int nn, const float* w2, float* y, int64_t d,
                              int64_t c) {
  typedef typename Vec<W>::type v_t;
  for (; c + C * W <= d; c += C * W) {
    v_t acc[C];
#pragma GCC unroll 16
    for (int v = 0; v < C; ++v) acc[v] = vload<W>(y + c + v * W);
    for (int k = 0; k < nn; ++k) {
      const float a = h[nz[k]];
      const float* w = w2 + (int64_t)nz[k] * d + c;
#pragma GCC unroll 16
      for (int v = 0; v < C; ++v) acc[v] += a * vload<W>(w + v * W);
    }
#pragma GCC unroll 16
    for (int v = 0; v < C; ++v) vstore<W>(y + c + v * W, acc[v]);
  }
  return c;
}

// fc1 then fc2 for the N tokens tok[0, N) of one group. fc2 runs per token over its own nonzero hidden values
// only: ReLU zeros add nothing, and as natural sparsity rises they are most of an open group's values.
template <int G, int N>
static inline void chunk(const float* x, const int64_t* tok, const float* w1, const float* b1, const float* w2,
                         float* y, int64_t d) {
  alignas(64) float h[N][G];
  const float* xr[N];
  for (int r = 0; r < N; ++r) xr[r] = x + tok[r] * d;
  uint64_t nonzero[N];  // per token, a bit per nonzero hidden value
  fc1_chunk<G, N>(xr, w1, b1, h, nonzero, d);
  for (int r = 0; r < N; ++r) {
    if (nonzero[r] == 0) continue;
    int nz[G];  // the token's nonzero hidden values, listed without a branch per value
    int nn = 0;
    for (uint64_t bits = nonzero[r]; bits; bits &= bits - 1) nz[nn++] = __builtin_ctzll(bits);
    float* yr = y + tok[r] * d;
    int64_t c = fc2_row<YC>(h[r], nz, nn, w2, yr, d, 0);
    c = fc2_row<4>(h[r], nz, nn, w2, yr, d, c);
    c = fc2_row<1>(h[r], nz, nn, w2, yr, d, c);
    for (; c < d; ++c) {  // widths that are no multiple of the vector
      float s = yr[c];
      for (int k = 0; k < nn; ++k) s += h[r][nz[k]] * w2[(int64_t)nz[k] * d + c];
      yr[c] = s;
    }
  }
}

// Calls f(g) for each open group g of one token's mask row, in ascending order. Eight flags are read per word (a
// bool is one byte, 0 or 1; the multiply packs a word's eight into the low bits of its top byte), so a mostly closed
// row costs a few loads and only its open groups cost more; no branch per flag.
template <typename F>
static inline void for_each_open(const bool* row, int64_t groups, F f) {
  int64_t g = 0;
  for (; g + 8 <= groups; g += 8) {
    uint64_t word;
    std::memcpy(&word, row + g, 8);
    for (uint64_t bits = (word * 0x0102040810204080ULL) >> 56; bits; bits &= bits - 1) f(g + __builtin_ctzll(bits));
  }
  for (; g < groups; ++g)
    if (row[g]) f(g);
}

// Tokens [t0, t1) of y[t] = b2 + sum over open groups g of W2[g]^T relu(W1[g]^T x[t] + b1[g]).
// weights: per group one contiguous block, fc1 (d, G) with one k step G contiguous floats, then fc2 (G, d) with
// hidden unit n's output column contiguous.
template <int G>
static void tile_kernel(const float* x, const bool* mask, const float* weights, const float* b1, float* y,
                        int64_t t0, int64_t t1, int64_t d, int64_t groups) {
  constexpr int NT = Shape<G>::NT;
  // The tile's open (token, group) pairs grouped by group, tokens ascending: a counting sort over the mask rows.
  std::vector<int64_t> start(groups + 1, 0);
  for (int64_t t = t0; t < t1; ++t) for_each_open(mask + t * groups, groups, [&](int64_t g) { ++start[g + 1]; });
  for (int64_t g = 0; g < groups; ++g) start[g + 1] += start[g];
  std::vector<int64_t> tokens(start[groups]), next(start.begin(), start.end() - 1);
  for (int64_t t = t0; t < t1; ++t) for_each_open(mask + t * groups, groups, [&](int64_t g) { tokens[next[g]++] = t; });
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t m = start[g + 1] - start[g];
    const int64_t* tok = tokens.data() + start[g];
    const float* w1 = weights + g * 2 * d * G;
    const float* w2 = w1 + d * G;
    const float* bg = b1 + g * G;
    int64_t i = 0;
    for (; i + NT <= m; i += NT) chunk<G, NT>(x, tok + i, w1, bg, w2, y, d);
    switch (m - i) {  // the rest: fewer than NT tokens
      case 0: break;
      case 1: chunk<G, 1>(x, tok + i, w1, bg, w2, y, d); break;
      case 2: chunk<G, std::min(2, NT)>(x, tok + i, w1, bg, w2, y, d); break;
      case 3: chunk<G, std::min(3, NT)>(x, tok + i, w1, bg, w2, y, d); break;
      case 4: chunk<G, std::min(4, NT)>(x, tok + i, w1, bg, w2, y, d); break;
      case 5: chunk<G, std::min(5, NT)>(x, tok + i, w1, bg, w2, y, d); break;
      case 6: chunk<G, std::min(6, NT)>(x, tok + i, w1, bg, w2, y, d); break;
      default: chunk<G, std::min(7, NT)>(x, tok + i, w1, bg, w2, y, d); break;
    }
  }
}

template <int G>
static void run(const float* x, const bool* mask, const float* weights, const float* b1, float* y, int64_t tokens,
                int64_t d, int64_t groups, int64_t tile) {
  const int64_t tiles = (tokens + tile - 1) / tile;
  // torch.set_num_threads decides, whichever OpenMP runtime this module was linked against.
  const int threads = (int)std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tiles));
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t c = 0; c < tiles; ++c)
    tile_kernel<G>(x, mask, weights, b1, y, c * tile, std::min(tokens, (c + 1) * tile), d, groups);
}

torch::Tensor gated_ffn(torch::Tensor x, torch::Tensor mask, torch::Tensor weights, torch::Tensor b1,
                        torch::Tensor b2, int64_t tile) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(), "x: contiguous float32 (tokens, d)");
  TORCH_CHECK(mask.dtype() == torch::kBool && mask.dim() == 2 && mask.is_contiguous() && mask.size(0) == x.size(0),
              "mask: contiguous bool (tokens, groups)");
  const int64_t tokens = x.size(0), d = x.size(1), groups = mask.size(1);
  TORCH_CHECK(weights.dtype() == torch::kFloat32 && weights.is_contiguous() && weights.dim() == 2 &&
              weights.size(0) == groups && weights.size(1) % (2 * d) == 0, "weights: contiguous float32 (groups, 2 d G)");
  const int64_t G = weights.size(1) / (2 * d);
  auto y = b2.unsqueeze(0).expand({tokens, d}).contiguous();
  if (tokens == 0) return y;
  const float* xp = x.data_ptr<float>();
  const bool* mp = mask.data_ptr<bool>();
  const float* w = weights.data_ptr<float>();
  const float* b1p = b1.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  switch (G) {
    case 8: run<8>(xp, mp, w, b1p, yp, tokens, d, groups, tile); break;
    case 16: run<16>(xp, mp, w, b1p, yp, tokens, d, groups, tile); break;
    case 32: run<32>(xp, mp, w, b1p, yp, tokens, d, groups, tile); break;
    case 64: run<64>(xp, mp, w, b1p, yp, tokens, d, groups, tile); break;
    default: TORCH_CHECK(false, "group size ", G, " has no compiled kernel (8, 16, 32, 64)");
  }
  return y;
}
"""

# Group sizes with a compiled specialisation (the inner loop is one G-wide vector).
KERNEL_GROUP_SIZES = (8, 16, 32, 64)

# Builds below the CPU's own instruction set, by the compile flags they add to CFLAGS. "avx2" on a CPU with AVX-512
# compiles the AVX2 code path (8-float vectors, 16 registers), the one the project's other machine class runs, so
# that it is tested and timed on either class (benchmarks/kernel_isa.py). "native" is -march=native as it is.
REDUCED_BUILDS = {"avx2": ("-mno-avx512f",)}


def instruction_sets(flags: frozenset[str] | None = None) -> tuple[str, ...]:
    """The builds this CPU (its `flags`, default /proc/cpuinfo's) runs: "native", and "avx2" where it has AVX-512
    too (without AVX-512 the native build is the AVX2 one)."""
    flags = cpu_flags() if flags is None else flags
    return ("native",) + (("avx2",) if {"avx2", "avx512f"} <= flags else ())


def compile_flags(instruction_set: str = "native") -> tuple[str, ...]:
    if instruction_set == "native":
        return CFLAGS
    if instruction_set not in REDUCED_BUILDS:
        raise ValueError(f"instruction_set = {instruction_set!r} is not allowed: allowed values: native, "
                         f"{', '.join(REDUCED_BUILDS)}")
    return CFLAGS + REDUCED_BUILDS[instruction_set]


def cpu_kernel(instruction_set: str = "native"):
    """The compiled extension for `instruction_set` (see REDUCED_BUILDS), or None (logged once) where it cannot be
    built here."""
    return _built(instruction_set)


@lru_cache(maxsize=None)
def _built(instruction_set: str):  # one cache entry per build, however cpu_kernel was called
    flags = compile_flags(instruction_set)
    if os.environ.get("DETR_SPARSITY_NO_KERNEL"):
        log.info("sparse FFN: DETR_SPARSITY_NO_KERNEL is set; using the PyTorch dispatch path")
        return None
    try:
        from torch.utils.cpp_extension import load_inline

        return load_inline(extension_name(instruction_set), cpp_sources=SOURCE, functions=["gated_ffn"],
                           extra_cflags=list(flags), extra_ldflags=list(LDFLAGS), verbose=False)
    except Exception as err:  # no compiler, no ninja, or a failed build: the PyTorch path still works
        log.warning("sparse FFN: the C++ kernel could not be built (%s: %s); using the slower PyTorch "
                    "dispatch path", type(err).__name__, str(err).strip().splitlines()[-1] if str(err).strip() else "")
        return None


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags as the kernel reports them (x86 `flags`, Arm `Features`); empty where unknown.

    All of them, not a chosen few: `-march=native` may use any instruction the CPU announces, and a flag that
    changes nothing in the build only costs a second build."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    found = re.search(r"^(?:flags|Features)\s*:(.*)$", text, flags=re.MULTILINE)
    return frozenset(found.group(1).split()) if found else frozenset()


def build_key(cflags: tuple[str, ...], flags: frozenset[str], machine: str = "") -> str:
    """A short hash of the compile flags and the CPU's instruction set: equal keys, interchangeable builds."""
    text = "\n".join([" ".join(cflags), machine, " ".join(sorted(flags))])
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def extension_name(instruction_set: str = "native") -> str:
    """The compiled module's name, and so its build directory: `<EXTENSION_NAME>_<capability>_<key>`, e.g.
    `detr_sparsity_gated_ffn_v2_avx512_3f9c2a1b7d`; a reduced build names its instruction set instead of torch's
    capability (`..._avx2_<key>`). Where the CPU's flags cannot be read (no /proc/cpuinfo), the processor's name
    stands in for them."""
    import torch

    capability = instruction_set if instruction_set != "native" else (
        re.sub(r"[^a-z0-9]+", "", torch.backends.cpu.get_cpu_capability().lower()) or "cpu")
    flags = cpu_flags() or frozenset({platform.processor() or "unknown"})
    key = build_key(compile_flags(instruction_set) + LDFLAGS, flags, platform.machine())
    return f"{EXTENSION_NAME}_{capability}_{key}"


if __name__ == "__main__":
    # `python -m detr_sparsity.execution.cpu_kernel`: build (or find) this CPU's native kernel now, as `make install`
    # does beside pip; best effort, as at first use: a failed build is logged and the jobs take the PyTorch path.
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    kernel = cpu_kernel()
    log.info("sparse FFN: C++ kernel %s", "ready" if kernel is not None else "not built")
