"""Is a register-blocked fc2 faster than today's CPU kernel? One run, interleaved, identical masks.

Today's kernel (`execution/cpu_kernel.py`) blocks fc1 (4 tokens x one G-wide vector) but does fc2 as one rank-1
update per nonzero hidden value, `y[token, 0:d] += h * W2t[n, 0:d]`: every hidden value loads and stores the
token's whole output row. The candidate here (`BLOCKED_SOURCE`) keeps fc1 as it is and does fc2 in register chunks
of the output (each chunk of y loaded and stored once per group), in two forms:
- `blocked4`: per group and tile of up to 4 tokens, `y[4, d] += h[4, G] . W2t[G, d]`, each W2 vector loaded once
  for all 4 tokens, leaving out a token whose G ReLU outputs are all zero and a hidden unit zero for all of them;
- `rowwise`: each token alone, over only its own nonzero hidden values (today's skipping, without today's
  load and store of y per value).
fc1's and fc2's weights of a group lie in one contiguous block, prepared once. Each runs at several tiles of
tokens (`--tiles`), and so does today's kernel (`today_tile<N>`; `today` at its shipped tile, `kernel_tile`), so that a gain of
the new fc2 is told apart from a gain of the tile.

Measured (benchmarks/results/fc2_blocked.json, AMD EPYC with AVX-512, 2 vCPUs shared, load average 2.4-2.8):
at the same tile the candidate was faster than today's kernel in 13 of 36 comparisons, mostly by under 5 %, and
slower at sparsity 0.5 in 10 of 12 (by up to 15 %): fc2 is the smaller part of the work once ReLU has zeroed 80 % of the hidden
values, and today's kernel already skips every zero. Not adopted. The tile did matter: today's kernel at 128
tokens per tile against the 16 it then shipped, 1 thread: 1.1-1.15x faster at sparsity 0.5, 1.5x at 0.9, 1.7-2.1x at 0.95
(2 threads, random masks: 1.6x at 0.9, 2.3x at 0.95); the decoder's 100 queries are not measured here. The
kernel now sizes its tiles by `execution.gated_ffn.kernel_tile`.

Shape: DETR-R50's encoder FFN block (850 tokens, d 256, H 2048, G 16). Inputs standard normal; fc1's bias is
shifted so that ReLU zeroes about 80 % of the hidden values (DETR-R50's shallow encoder blocks: 74-86 %).
Masks at induced sparsity 0.5 / 0.9 / 0.95, two kinds, the same for every kernel:
- random: each (token, group) pair open with probability 1 - sparsity (the ReLU zeros fall anywhere);
- gate-like: per token the groups with the largest ReLU mass, as many as the sparsity leaves (what a trained
  gate approximates: the open groups hold most of the nonzero activations; each token's count varies +-50 %).
Per (mask kind, sparsity, threads) the variants run interleaved (order rotated every repeat) after a warm-up, and
medians are reported; the load average is recorded (the machine is shared). No gate in the timing.

    PYTHONPATH=src python benchmarks/fc2_blocked.py                    # writes benchmarks/results/fc2_blocked.json
    PYTHONPATH=src python benchmarks/fc2_blocked.py --repeats 31 --tiles 16 32 64
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import torch
from torch import nn

from detr_sparsity.atomic import write_json
from detr_sparsity.execution.benchmark import medians_ms
from detr_sparsity.execution.cpu_kernel import CFLAGS, LDFLAGS, build_key, cpu_flags, cpu_kernel
from detr_sparsity.execution.gated_ffn import PackedFFN, kernel_tile
from detr_sparsity.machine import environment

BLOCKED_SOURCE = r"""
#include <torch/extension.h>
#include <algorithm>
#include <vector>

// Vector width and output chunk per ISA: the chunk of 4 tokens x CV vectors stays in registers
// (AVX-512: 16 of 32 zmm; AVX2: 8 of 16 ymm), with CV more for one W2 row's chunk.
#if defined(__AVX512F__)
constexpr int W = 16, CV = 4;
#elif defined(__AVX__)
constexpr int W = 8, CV = 2;
#else
constexpr int W = 4, CV = 2;
#endif
typedef float vec __attribute__((vector_size(W * sizeof(float))));
typedef float uvec __attribute__((vector_size(W * sizeof(float)), aligned(4)));
static inline vec vload(const float* p) { return *(const uvec*)p; }
static inline void vstore(float* p, vec v) { *(uvec*)p = v; }

// y[r, :] += sum over k of h[r][nz[k]] * w2[nz[k], :] for N tokens, in chunks of CV vectors held in registers.
template <int N, int G, int C>
static inline int64_t fc2_chunks(const float (*h)[G], const int* nz, int nn, const float* w2, float* const* yr,
                                 int64_t d, int64_t c) {
  for (; c + C * W <= d; c += C * W) {
    vec acc[N][C];
#pragma GCC unroll 16
    for (int r = 0; r < N; ++r)
#pragma GCC unroll 16
      for (int v = 0; v < C; ++v) acc[r][v] = vload(yr[r] + c + v * W);
    for (int k = 0; k < nn; ++k) {
      const float* w = w2 + (int64_t)nz[k] * d + c;
      vec wv[C];
#pragma GCC unroll 16
      for (int v = 0; v < C; ++v) wv[v] = vload(w + v * W);
#pragma GCC unroll 16
      for (int r = 0; r < N; ++r) {
        const float a = h[r][nz[k]];
#pragma GCC unroll 16
        for (int v = 0; v < C; ++v) acc[r][v] += a * wv[v];
      }
    }
#pragma GCC unroll 16
    for (int r = 0; r < N; ++r)
#pragma GCC unroll 16
      for (int v = 0; v < C; ++v) vstore(yr[r] + c + v * W, acc[r][v]);
  }
  return c;
}

template <int N, int G>
static inline void fc2_tile(const float (*h)[G], const int* nz, int nn, const float* w2, float* const* yr,
                            int64_t d) {
  int64_t c = fc2_chunks<N, G, CV>(h, nz, nn, w2, yr, d, 0);
  c = fc2_chunks<N, G, 1>(h, nz, nn, w2, yr, d, c);
  for (; c < d; ++c)  // widths that are no multiple of the vector
    for (int r = 0; r < N; ++r) {
      float s = yr[r][c];
      for (int k = 0; k < nn; ++k) s += h[r][nz[k]] * w2[(int64_t)nz[k] * d + c];
      yr[r][c] = s;
    }
}

// wp: per group one block [fc1 (d, G) | fc2 (G, d)], fc1's rows transposed so that one k step is one G-wide vector.
template <int G>
static void tile_kernel(const float* x, const bool* mask, const float* wp, const float* b1, float* y,
                        int64_t t0, int64_t t1, int64_t d, int64_t groups, bool block_tokens) {
  std::vector<int64_t> tokens(t1 - t0);
  for (int64_t g = 0; g < groups; ++g) {
    int64_t m = 0;
    for (int64_t t = t0; t < t1; ++t)
      if (mask[t * groups + g]) tokens[m++] = t;
    const float* wg = wp + g * 2 * d * G;
    const float* w2 = wg + d * G;
    const float* bg = b1 + g * G;
    for (int64_t i = 0; i < m; i += 4) {
      const int n = (int)std::min<int64_t>(4, m - i);
      alignas(64) float h[4][G];
      const float* xr[4];
      for (int r = 0; r < 4; ++r) {
        xr[r] = x + tokens[i + std::min(r, n - 1)] * d;
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
      // ReLU; tokens whose G outputs are all zero add nothing and leave the tile.
      alignas(64) float hv[4][G];
      float* yr[4];
      int na = 0;
      for (int r = 0; r < n; ++r) {
        bool any = false;
        for (int j = 0; j < G; ++j) {
          const float v = h[r][j] > 0.f ? h[r][j] : 0.f;
          hv[na][j] = v;
          any |= v > 0.f;
        }
        if (any) yr[na++] = y + tokens[i + r] * d;
      }
      if (na == 0) continue;
      int nz[G];  // hidden units nonzero for some token of the tile
      int nn = 0;
      if (!block_tokens) {  // each token alone: only its own nonzero hidden values, its chunk in registers
        for (int r = 0; r < na; ++r) {
          nn = 0;
          for (int j = 0; j < G; ++j)
            if (hv[r][j] > 0.f) nz[nn++] = j;
          fc2_tile<1, G>(hv + r, nz, nn, w2, yr + r, d);
        }
        continue;
      }
      for (int j = 0; j < G; ++j) {
        bool any = false;
        for (int r = 0; r < na; ++r) any |= hv[r][j] > 0.f;
        if (any) nz[nn++] = j;
      }
      switch (na) {
        case 1: fc2_tile<1, G>(hv, nz, nn, w2, yr, d); break;
        case 2: fc2_tile<2, G>(hv, nz, nn, w2, yr, d); break;
        case 3: fc2_tile<3, G>(hv, nz, nn, w2, yr, d); break;
        default: fc2_tile<4, G>(hv, nz, nn, w2, yr, d); break;
      }
    }
  }
}

template <int G>
static void run(const float* x, const bool* mask, const float* wp, const float* b1, float* y,
                int64_t tokens, int64_t d, int64_t groups, int64_t tile, bool block_tokens) {
  const int64_t tiles = (tokens + tile - 1) / tile;
  const int threads = (int)std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tiles));
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t c = 0; c < tiles; ++c)
    tile_kernel<G>(x, mask, wp, b1, y, c * tile, std::min(tokens, (c + 1) * tile), d, groups, block_tokens);
}

torch::Tensor gated_ffn_blocked(torch::Tensor x, torch::Tensor mask, torch::Tensor wp, torch::Tensor b1,
                                torch::Tensor b2, int64_t group_size, int64_t tile, bool block_tokens) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(), "x: contiguous float32 (tokens, d)");
  TORCH_CHECK(mask.dtype() == torch::kBool && mask.is_contiguous(), "mask: contiguous bool (tokens, groups)");
  TORCH_CHECK(wp.is_contiguous() && wp.dim() == 2 && wp.size(1) == 2 * x.size(1) * group_size,
              "weights: contiguous (groups, 2 d G)");
  const int64_t tokens = x.size(0), d = x.size(1), groups = mask.size(1);
  auto y = b2.unsqueeze(0).expand({tokens, d}).contiguous();
  if (tokens == 0) return y;
  const float* xp = x.data_ptr<float>();
  const bool* mp = mask.data_ptr<bool>();
  const float* w = wp.data_ptr<float>();
  const float* b1p = b1.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  switch (group_size) {
    case 8: run<8>(xp, mp, w, b1p, yp, tokens, d, groups, tile, block_tokens); break;
    case 16: run<16>(xp, mp, w, b1p, yp, tokens, d, groups, tile, block_tokens); break;
    case 32: run<32>(xp, mp, w, b1p, yp, tokens, d, groups, tile, block_tokens); break;
    case 64: run<64>(xp, mp, w, b1p, yp, tokens, d, groups, tile, block_tokens); break;
    default: TORCH_CHECK(false, "group size ", group_size, " has no compiled kernel (8, 16, 32, 64)");
  }
  return y;
}
"""

TOKENS, D, H, G = 850, 256, 2048, 16
SPARSITIES = (0.5, 0.9, 0.95)


def blocked_kernel():
    from torch.utils.cpp_extension import load_inline

    key = build_key(CFLAGS + LDFLAGS, cpu_flags(), platform.machine())
    return load_inline(f"detr_sparsity_fc2_blocked_{key}", cpp_sources=BLOCKED_SOURCE,
                       functions=["gated_ffn_blocked"], extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS))


def group_layout(packed: PackedFFN) -> torch.Tensor:
    """Per group one contiguous block: fc1 (d, G) then fc2 (G, d)."""
    return torch.cat([packed.w1g.reshape(packed.groups, -1), packed.w2g.reshape(packed.groups, -1)], 1).contiguous()


def masks(kind: str, activations: torch.Tensor, sparsity: float, generator: torch.Generator) -> torch.Tensor:
    tokens, groups = activations.shape[0], activations.shape[1] // G
    if kind == "random":
        return torch.rand(tokens, groups, generator=generator) >= sparsity
    mass = activations.view(tokens, groups, G).sum(-1)
    # each token keeps (1 - sparsity) of the groups on average, between half and 1.5 times that
    keep = ((1 - sparsity) * groups * (0.5 + torch.rand(tokens, generator=generator))).round().clamp(1, groups)
    rank = mass.argsort(dim=1, descending=True).argsort(dim=1)
    return rank < keep.unsqueeze(1)


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tiles", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--natural-sparsity", type=float, default=0.8)
    parser.add_argument("--out", default="benchmarks/results/fc2_blocked.json")
    args = parser.parse_args(argv)

    today, blocked = cpu_kernel(), blocked_kernel()
    if today is None:
        print("no compiled kernel here (no compiler?): nothing to compare", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(D, H), nn.Linear(H, D)
    x = torch.randn(TOKENS, D)
    # Shift fc1's bias so that ReLU zeroes `natural_sparsity` of the hidden values, as a trained DETR does.
    fc1.bias -= torch.quantile(fc1(x).flatten()[::7], args.natural_sparsity)
    activations = torch.relu(fc1(x))
    natural = float((activations == 0).float().mean())
    packed = PackedFFN(fc1, fc2, G)
    layout = group_layout(packed)
    w2 = packed.w2g.view(-1, D)
    generator = torch.Generator().manual_seed(1)
    load_start = list(os.getloadavg())
    rows = []
    for kind in ("random", "gate-like"):
        for sparsity in SPARSITIES:
            mask = masks(kind, activations, sparsity, generator).contiguous()
            expected = fc2(activations * mask.repeat_interleave(G, dim=1).float())
            in_open = float((activations.view(TOKENS, -1, G)[mask] > 0).float().mean())
            variants = {"dense": lambda: fc2(torch.relu(fc1(x))),
                        "today": lambda: today.gated_ffn(x, mask, packed.w1g, packed.b1g.view(-1), w2, packed.b2,
                                                         kernel_tile(TOKENS, torch.get_num_threads()))}
            for tile in args.tiles:  # today's kernel at the candidate's tiles too: which part of a gain is the tile
                variants[f"today_tile{tile}"] = (lambda tile=tile: today.gated_ffn(
                    x, mask, packed.w1g, packed.b1g.view(-1), w2, packed.b2, tile))
                for name, block_tokens in (("blocked4", True), ("rowwise", False)):
                    variants[f"{name}_tile{tile}"] = (
                        lambda tile=tile, block_tokens=block_tokens: blocked.gated_ffn_blocked(
                            x, mask, layout, packed.b1g.view(-1), packed.b2, G, tile, block_tokens))
            for name, run in variants.items():  # every sparse variant computes the masked FFN
                if name != "dense":
                    torch.testing.assert_close(run(), expected, rtol=1e-4, atol=1e-4)
            for threads in args.threads:
                torch.set_num_threads(threads)
                load = os.getloadavg()[0]
                ms = medians_ms(variants, args.repeats, args.warmup)
                # Today's kernel over the best candidate at the same tile (> 1: the candidate is faster), and
                # over the best candidate at any tile against today's kernel as it ships (its kernel_tile).
                same_tile = {tile: round(ms[f"today_tile{tile}"] / min(ms[f"blocked4_tile{tile}"],
                                                                       ms[f"rowwise_tile{tile}"]), 3)
                             for tile in args.tiles}
                best = min((n for n in ms if n.startswith(("blocked4", "rowwise"))), key=ms.get)
                row = {"mask": kind, "induced_sparsity": round(1 - float(mask.float().mean()), 4),
                       "nonzero_in_open_groups": round(in_open, 4), "threads": threads,
                       "today_tile": kernel_tile(TOKENS, threads),
                       "load_average_1min": load, "ms": {n: round(v, 3) for n, v in ms.items()},
                       "speedup_vs_dense": {n: round(ms["dense"] / v, 2) for n, v in ms.items() if n != "dense"},
                       "candidate_over_today_same_tile": same_tile,
                       "best_candidate": best, "best_candidate_over_today_as_shipped": round(ms["today"] / ms[best], 3)}
                rows.append(row)
                print(f"{kind:9s} sparsity {sparsity:.2f} threads {threads} load {load:4.1f}: dense "
                      f"{ms['dense']:.2f} ms; " + ", ".join(f"{n} {v:.2f}" for n, v in ms.items() if n != "dense") +
                      f"; candidate over today at the same tile {same_tile}", flush=True)
    result = {"benchmark": "fc2_blocked", "shape": {"tokens": TOKENS, "d": D, "H": H, "G": G},
              "natural_sparsity": round(natural, 4), "repeats": args.repeats, "warmup": args.warmup,
              "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "environment": {**environment(), "load_average": {"start": load_start, "end": list(os.getloadavg())}},
              "rows": rows,
              "verdict": {
                  "candidate_faster_at_the_same_tile": sum(v > 1 for r in rows
                                                           for v in r["candidate_over_today_same_tile"].values()),
                  "comparisons_at_the_same_tile": sum(len(r["candidate_over_today_same_tile"]) for r in rows),
                  "candidate_faster_than_today_as_shipped": sum(r["best_candidate_over_today_as_shipped"] > 1
                                                                for r in rows),
                  "rows": len(rows)}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
