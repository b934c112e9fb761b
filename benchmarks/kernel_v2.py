"""The sparse kernel against the one it replaced, on identical masks in one run: is the register-blocked fc2 faster?

The previous kernel (`PREVIOUS_SOURCE`, kept here verbatim as the baseline) blocked fc1 (4 tokens x one G-wide
vector) but did fc2 as one rank-1 update per nonzero hidden value, `y[token, 0:d] += h * W2t[n, 0:d]`: every hidden
value loaded and stored the token's whole output row, so fc2 was bound by L1 traffic, not by FMAs, and a branch per
hidden value mispredicted on ReLU's zeros. Today's (`execution/cpu_kernel.py`) holds up to 8 tokens' fc1 outputs in
registers and does fc2 per token over its own nonzero hidden values with the output row in registers (each chunk of
y loaded and stored once per group), the nonzero values listed without a branch, and one contiguous block of
weights per group (fc1, then fc2).

Rows, per block kind, target and thread count (dense fc1/fc2, the previous kernel and today's, each over the six
blocks, interleaved with the order rotated every repeat, after a warm-up; medians):
- `trained`: DETR-R50's FFN blocks as the benchmark stage builds them (`execution.benchmark.r50_blocks`: d 256,
  H 2048, six blocks of 850 encoder tokens and six of 100 queries, random seeded weights and inputs, so about half
  the hidden values are ReLU zeros) with masks sampled from the study's trained gates of `benchmark.objective`;
- `random`: the same blocks, each (token, group) pair open with the probability the trained masks have;
- `study`: the study's own blocks on real activations (the first evaluation batch through the dense model; the
  trained gates' decisions on them), where ReLU zeroes most hidden values.
The gate is left out of the timing (the same work for both kernels), so the FLOPs bound here is dense MACs / kept
MACs, and `fraction` is a speed-up over that bound. The `trained` rows also time `today_with_gate`: the sparse path
as the take-away model and the benchmark stage run it (the block's gate computed each call, then the kernel), against
the bound with the gate's MACs (`flops_bound_with_gate`), with only these three variants in rotation, where the stage
rotates 22.

    python benchmarks/kernel_v2.py                  # writes results/<study>/benchmark/kernel_v2.json
    python benchmarks/kernel_v2.py --repeats 21 --thread-counts 2
"""

from __future__ import annotations

import os
import sys

import torch

from detr_sparsity.execution import benchmark as speed
from detr_sparsity.execution.cpu_kernel import CFLAGS, EXTENSION_NAME, LDFLAGS, cpu_kernel, extension_name
from detr_sparsity.execution.gated_ffn import PackedFFN, kernel_tile, sparse_ffn

from _common import kernel_arguments, kernel_direct, kernel_study_inputs, parse, report

PREVIOUS_SOURCE = r"""
#include <torch/extension.h>
#include <algorithm>
#include <vector>

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
      for (int r = 0; r < n; ++r) {
        float* yr = y + tokens[i + r] * d;
        for (int j = 0; j < G; ++j) {
          const float a = h[r][j];
          if (!(a > 0.f)) continue;
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
  const int threads = (int)std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tiles));
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t c = 0; c < tiles; ++c)
    tile_kernel<G>(x, mask, w1g, b1, w2t, y, c * tile, std::min(tokens, (c + 1) * tile), d, groups);
}

torch::Tensor gated_ffn(torch::Tensor x, torch::Tensor mask, torch::Tensor w1g, torch::Tensor b1,
                        torch::Tensor w2t, torch::Tensor b2, int64_t tile) {
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


def previous_kernel():
    """The previous kernel, built beside today's for the same CPU (its own name, the same flags)."""
    from torch.utils.cpp_extension import load_inline

    name = extension_name().replace(EXTENSION_NAME, f"{EXTENSION_NAME}_previous")
    return load_inline(name, cpp_sources=PREVIOUS_SOURCE, functions=["gated_ffn"], extra_cflags=list(CFLAGS),
                       extra_ldflags=list(LDFLAGS))


def random_masks(masks: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Per block a mask of the same shape, each pair open with that block's open rate, independently."""
    return {name: torch.rand(m.shape, generator=generator) < m.float().mean() for name, m in masks.items()}


def compare(previous, today, blocks: list[speed.Block], masks: dict[str, torch.Tensor], thread_counts: list[int],
            repeats: int, warmup: int, target: str | None = None) -> list[dict]:
    """Dense, the `previous` kernel and `today`'s (both called directly, with the same tile) over `blocks`, on the same
    masks, at each thread count. With `target` (R50 blocks with their sampled masks) also today's kernel as the
    take-away model runs it, its gate computed each call (`execution.benchmark.mgs_sparse`, the stage's sparse
    variant), against the bound with the gate's MACs."""
    for b in blocks:  # as the stage packs them (`mgs_sparse` reads `packed`)
        b.packed = PackedFFN(b.fc1, b.fc2, b.group_size)

    # the previous kernel takes fc1 and fc2 apart; their copies are made once, outside the timing
    layouts = {b.name: (b.packed.w1g.contiguous(), b.packed.w2g.reshape(-1, b.fc2.out_features).contiguous())
               for b in blocks}

    def previous_run() -> list[torch.Tensor]:
        return [previous.gated_ffn(b.tokens, masks[b.name], layouts[b.name][0], b.packed.b1g.view(-1),
                                   layouts[b.name][1], b.packed.b2,
                                   kernel_tile(b.tokens.shape[0], torch.get_num_threads())) for b in blocks]

    today_run = kernel_direct(today, blocks, masks, {b.name: b.packed for b in blocks})  # called as the previous is

    # The rotation keeps this cyclic order, so no variant runs right after one that read the same weights (it would
    # find them in cache): today's kernel with the gate follows dense, the previous kernel follows it.
    variants = {"dense": lambda: [speed.dense_ffn(b) for b in blocks]}
    if target is not None:
        variants["today_with_gate"] = lambda: [speed.mgs_sparse(b, target) for b in blocks]
    variants["previous"] = previous_run
    variants["today"] = today_run
    rows = []
    with torch.no_grad():
        through_sparse_ffn = [sparse_ffn(b.tokens, masks[b.name], b.packed) for b in blocks]
        for old, new, wrapped in zip(previous_run(), today_run(), through_sparse_ffn):
            torch.testing.assert_close(old, new, rtol=1e-4, atol=1e-4)  # the same function, summed in another order
            assert torch.equal(new, wrapped)  # today's kernel as the sparse path calls it
        kept = sum(int(masks[b.name].sum()) * b.group_size for b in blocks)
        positions = sum(b.tokens.shape[0] * b.fc1.out_features for b in blocks)
        # dense MACs over kept MACs plus the gate's, as the stage counts them (`execution.benchmark.block_rows`)
        with_gate = sum(b.macs for b in blocks) / (2 * kept * blocks[0].fc1.in_features
                                                   + sum(b.gate_macs for b in blocks))
        open_values = torch.cat([torch.relu(b.fc1(b.tokens)).view(b.tokens.shape[0], -1, b.group_size)[masks[b.name]]
                                 .flatten() for b in blocks])
        for threads in thread_counts:
            torch.set_num_threads(threads)
            ms = speed.medians_ms(variants, repeats, warmup)
            speedup = {n: ms["dense"] / ms[n] for n in ms if n != "dense"}
            bound = {n: positions / kept for n in speedup}
            if "today_with_gate" in speedup:
                bound["today_with_gate"] = with_gate
            rows.append({"threads": threads, "tokens_per_block": blocks[0].tokens.shape[0],
                         "induced_sparsity": 1 - kept / positions, "flops_bound": positions / kept,
                         "flops_bound_with_gate": bound.get("today_with_gate"),
                         "nonzero_in_open_groups": float((open_values > 0).float().mean()),
                         "ms": ms, "speedup": speedup,
                         "fraction": {n: s / bound[n] for n, s in speedup.items()},
                         "today_over_previous": ms["previous"] / ms["today"],
                         "load_average_1min": os.getloadavg()[0]})
    return rows


def main(argv: list[str] | None = None) -> int:
    args, cfg = parse(kernel_arguments(__doc__, "kernel_v2"), argv)
    found = kernel_study_inputs(cfg)
    if found is None:
        return 2
    gate_files, thresholds, inputs = found
    previous, today = previous_kernel(), cpu_kernel()
    tokens = {"encoder": speed.R50["encoder_tokens"], "decoder": speed.R50["queries"]}
    generator = torch.Generator().manual_seed(cfg.seed)
    load_start = list(os.getloadavg())
    rows = []
    for kind in speed.KINDS:
        study = speed.study_blocks(inputs, kind)
        r50 = [b for b in speed.r50_blocks(kind, tokens[kind], study, list(gate_files), thresholds, cfg.seed)
               if b.gates]
        study = [b for b in study if b.gates]
        for target in gate_files:
            cases = {}
            if r50:
                trained = {b.name: b.open_groups[target].contiguous() for b in r50}
                cases["trained"] = (r50, trained, target)
                cases["random"] = (r50, random_masks(trained, generator), None)
            if study:
                with torch.no_grad():  # the trained gates' own decisions on the real activations
                    cases["study"] = (study, {b.name: b.gates[target].open_groups(b.gates[target](b.tokens))
                                              .contiguous() for b in study}, None)
            for masks_from, (blocks, masks, with_gate) in cases.items():
                for row in compare(previous, today, blocks, masks, args.thread_counts, args.repeats, args.warmup,
                                   with_gate):
                    row = {"kind": kind, "target": target, "masks": masks_from, **row}
                    rows.append(row)
                    print(f"{kind} {masks_from:7s} target {target} ({row['induced_sparsity']:.3f}, "
                          f"{row['nonzero_in_open_groups']:.2f} nonzero) {row['threads']} thread(s): dense "
                          f"{row['ms']['dense']:.2f} ms, previous {row['ms']['previous']:.2f}, today "
                          f"{row['ms']['today']:.2f}: {row['today_over_previous']:.2f}x; of the bound "
                          f"{row['flops_bound']:.2f}x: {row['fraction']['previous']:.2f} -> "
                          f"{row['fraction']['today']:.2f}" + (
                              f"; with the gate {row['speedup']['today_with_gate']:.2f}x of "
                              f"{row['flops_bound_with_gate']:.2f}x" if 'today_with_gate' in row['speedup'] else ""),
                          flush=True)
    ratios = [r["today_over_previous"] for r in rows]
    result = {"benchmark": "kernel_v2", "study": cfg.name, "objective": cfg.benchmark["objective"],
              "repeats": args.repeats, "warmup": args.warmup, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "load_average": {"start": load_start, "end": list(os.getloadavg())}, "rows": rows,
              "today_over_previous": {"min": min(ratios), "max": max(ratios),
                                      "faster_in": sum(r > 1 for r in ratios), "rows": len(ratios)}}
    return report(result, args.out, cfg.name,
                  f"today's kernel against the previous: {min(ratios):.2f}x to {max(ratios):.2f}x, faster in "
                  f"{sum(r > 1 for r in ratios)} of {len(rows)} rows")


if __name__ == "__main__":
    sys.exit(main())
