"""The CPU kernel of the sparse gated FFN: a small C++/OpenMP extension, compiled once and cached.

Why a compiled kernel (measured on the 2-core AMD EPYC of this project, DETR-R50 encoder block: 850 tokens,
d 256, H 2048, G 16, 90 % of the (token, group) pairs closed, 1 torch thread; medians):
- dense fc1/fc2 (MKL) 25 ms; masked dense 28 ms;
- PyTorch MoE-style dispatch (sort the open (token, group) pairs by group, gather the tokens,
  `torch._grouped_mm` over groups, index_add back) 13.9 ms, of which 3.4 ms gather, 4.0 + 2.9 ms the two
  grouped matmuls, 1.1 ms index_add: moving the gathered copies through memory costs as much as the math;
- padded batched matmuls (torch.bmm over groups, padded to the busiest group) 27.8 ms;
- this kernel about 4x faster than dense at 2 threads (10.6 ms against 46 ms on the loaded machine).
Stage `benchmark` on the default study (machine shared with other jobs, load average 3.5-4.7 on 2 cores),
six R50 encoder blocks at 90 % induced sparsity with masks sampled from the trained distillation gates, gate
cost included: 2.8x faster than dense fc1/fc2 with 2 threads, 4.1x with 1 thread (FLOPs allow 7.6x).
(Fusing fc2 with register-held output chunks over a compacted list of nonzero hidden values measured
slower, 1.5x against 4.4x, and was dropped. So was a register-blocked fc2 per group and tile, 4 tokens or each
token alone, with fc1 and fc2 of a group in one contiguous block: no faster at the same tile, slower at 50 %
sparsity; benchmarks/fc2_blocked.py. The same run found larger tiles faster for the encoder's 850 tokens, see
its JSON.)
The kernel never materialises the gathered tokens: each thread takes a tile of tokens, and for each group
the tile's tokens that open it, four at a time, so that the group's 16 x d weights stay in L1 and feed four
FMA chains. It also skips fc2's rows for hidden values that ReLU zeroed (they add nothing), so on real
activations it can beat the FLOPs ratio computed from the gate mask alone.

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

EXTENSION_NAME = "detr_sparsity_gated_ffn_v1"
CFLAGS = ("-O3", "-march=native", "-fopenmp")
LDFLAGS = ("-fopenmp",)

SOURCE = r"""
#include <torch/extension.h>
#include <algorithm>
#include <vector>

// Tokens [t0, t1) of y[t] = b2 + sum over open groups g of W2T[g]^T relu(W1G[g]^T x[t] + b1[g]).
// w1g: (groups, d, G), the group's fc1 rows transposed so that one k step is one G-wide vector;
// w2t: (H, d), fc2's weight transposed, so that hidden neuron n's output column is contiguous.
template <int G>
static void tile_kernel(const float* x, const bool* mask, const float* w1g, const float* b1, const float* w2t,
                        float* y, int64_t t0, int64_t t1, int64_t d, int64_t groups) {
  std::vector<int64_t> tokens(t1 - t0);
  for (int64_t g = 0; g < groups; ++g) {
    int64_t m = 0;
    for (int64_t t = t0; t < t1; ++t)
      if (mask[t * groups + g]) tokens[m++] = t;
    const float* wg = w1g + g * d * G;
    const float* bg = b1 + g * G;
    const float* w2 = w2t + g * G * d;
    for (int64_t i = 0; i < m; i += 4) {
      const int n = (int)std::min<int64_t>(4, m - i);
      alignas(64) float h[4][G];
      const float* xr[4];
      for (int r = 0; r < 4; ++r) {
        xr[r] = x + tokens[i + std::min(r, n - 1)] * d;  // a short chunk repeats its last token, unused
        for (int j = 0; j < G; ++j) h[r][j] = bg[j];
      }
      for (int64_t k = 0; k < d; ++k) {
        const float* w = wg + k * G;
        const float a0 = xr[0][k], a1 = xr[1][k], a2 = xr[2][k], a3 = xr[3][k];
#pragma omp simd
        for (int j = 0; j < G; ++j) {
          h[0][j] += a0 * w[j];
          h[1][j] += a1 * w[j];
          h[2][j] += a2 * w[j];
          h[3][j] += a3 * w[j];
        }
      }
      for (int r = 0; r < n; ++r) {
        float* yr = y + tokens[i + r] * d;
        for (int j = 0; j < G; ++j) {
          const float a = h[r][j];
          if (!(a > 0.f)) continue;  // ReLU zero: fc2's row adds nothing
          const float* w = w2 + j * d;
#pragma omp simd
          for (int64_t k = 0; k < d; ++k) yr[k] += a * w[k];
        }
      }
    }
  }
}

template <int G>
static void run(const float* x, const bool* mask, const float* w1g, const float* b1, const float* w2t, float* y,
                int64_t tokens, int64_t d, int64_t groups, int64_t tile) {
  const int64_t tiles = (tokens + tile - 1) / tile;
  // torch.set_num_threads decides, whichever OpenMP runtime this module was linked against.
  const int threads = (int)std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tiles));
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t c = 0; c < tiles; ++c)
    tile_kernel<G>(x, mask, w1g, b1, w2t, y, c * tile, std::min(tokens, (c + 1) * tile), d, groups);
}

torch::Tensor gated_ffn(torch::Tensor x, torch::Tensor mask, torch::Tensor w1g, torch::Tensor b1,
                        torch::Tensor w2t, torch::Tensor b2, int64_t tile) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(), "x: contiguous float32 (tokens, d)");
  TORCH_CHECK(mask.dtype() == torch::kBool && mask.is_contiguous(), "mask: contiguous bool (tokens, groups)");
  const int64_t tokens = x.size(0), d = x.size(1), groups = mask.size(1), G = w1g.size(2);
  auto y = b2.unsqueeze(0).expand({tokens, d}).contiguous();
  if (tokens == 0) return y;
  const float* xp = x.data_ptr<float>();
  const bool* mp = mask.data_ptr<bool>();
  const float* w1 = w1g.data_ptr<float>();
  const float* b1p = b1.data_ptr<float>();
  const float* w2 = w2t.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  switch (G) {
    case 8: run<8>(xp, mp, w1, b1p, w2, yp, tokens, d, groups, tile); break;
    case 16: run<16>(xp, mp, w1, b1p, w2, yp, tokens, d, groups, tile); break;
    case 32: run<32>(xp, mp, w1, b1p, w2, yp, tokens, d, groups, tile); break;
    case 64: run<64>(xp, mp, w1, b1p, w2, yp, tokens, d, groups, tile); break;
    default: TORCH_CHECK(false, "group size ", G, " has no compiled kernel (8, 16, 32, 64)");
  }
  return y;
}
"""

# Group sizes with a compiled specialisation (the inner loop is one G-wide vector).
KERNEL_GROUP_SIZES = (8, 16, 32, 64)


@lru_cache(maxsize=1)
def cpu_kernel():
    """The compiled extension, or None (logged once) where it cannot be built here."""
    if os.environ.get("DETR_SPARSITY_NO_KERNEL"):
        log.info("sparse FFN: DETR_SPARSITY_NO_KERNEL is set; using the PyTorch dispatch path")
        return None
    try:
        from torch.utils.cpp_extension import load_inline

        return load_inline(extension_name(), cpp_sources=SOURCE, functions=["gated_ffn"],
                           extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS), verbose=False)
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


def extension_name() -> str:
    """The compiled module's name, and so its build directory: `<EXTENSION_NAME>_<capability>_<key>`, e.g.
    `detr_sparsity_gated_ffn_v1_avx512_3f9c2a1b7d`. Where the CPU's flags cannot be read (no /proc/cpuinfo),
    the processor's name stands in for them."""
    import torch

    capability = re.sub(r"[^a-z0-9]+", "", torch.backends.cpu.get_cpu_capability().lower()) or "cpu"
    flags = cpu_flags() or frozenset({platform.processor() or "unknown"})
    return f"{EXTENSION_NAME}_{capability}_{build_key(CFLAGS + LDFLAGS, flags, platform.machine())}"
