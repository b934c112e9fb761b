"""Executing a gated FFN block without the masked work: y = fc2(m * relu(fc1 x)) where m opens whole groups of
G hidden neurons per token, computed only for the open (token, group) pairs.

Per-token group masks differ, and the union of the groups opened by many tokens approaches all groups, so
shrinking the matrices to that union saves little. Both paths here work per (token, group) pair instead:
- CPU, float32: the compiled kernel of `cpu_kernel` (tiles of tokens; per group, the tile's tokens that
  open it). Measured the fastest (see `cpu_kernel`).
- otherwise (CUDA, other dtypes, or no compiler): MoE-style dispatch in PyTorch: the open pairs sorted by
  group, the tokens gathered, one grouped matmul per layer over the groups, the results added back per token.
  On CPU `torch._grouped_mm` does the grouped matmuls; on CUDA padded batched matmuls (torch.bmm over groups,
  padded to the busiest group), which run on any GPU and dtype. The CUDA path is tested on CPU tensors by the
  same code; it has not been run on a GPU.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from detr_sparsity.execution.cpu_kernel import KERNEL_GROUP_SIZES, cpu_kernel

EXECUTIONS = ("masked", "sparse")
# Tokens per tile of the CPU kernel, at most. Per group the kernel runs fc1 for the tile's tokens that open it in
# chunks of up to 8, and fetches the group's weights (fc1 and fc2, 2 d G floats) once per tile: the fewer the tiles,
# the fuller the chunks and the fewer the fetches. So one tile per thread, up to this size, beyond which a tile's
# inputs and outputs (2 d floats per token: 2 MB for 1,024 tokens at d 256) outgrow a core's L2 (1 MB here) by more
# than measured. Measured by benchmarks/kernel_tile.py on the AVX-512 class (2026-12-06; R50 shapes, the study's
# trained gates' masks, every tiling on the same masks in one run; benchmarks/results/kernel_tile.json): against
# tiles of at most 256 tokens (the rule before, 213 for R50's 850 encoder tokens), one tile per thread (425 on 2
# threads, 850 on 1) was faster in all 12 R50 encoder rows, 1.02x to 1.24x; ad hoc, tiles of 850 were also the
# fastest for 1,700 tokens on 2 threads. Larger tiles were not measured. On the AVX2 class (2026-12-05, an earlier
# kernel) tiles of 256 were 1.14x to 1.91x faster than 16-token tiles.
KERNEL_MAX_TILE = 1024


def kernel_tile(tokens: int, threads: int, max_tile: int = KERNEL_MAX_TILE) -> int:
    """Tokens per tile: the fewest equal tiles, their number a multiple of `threads` (no thread waits on another's
    extra tile), of at most `max_tile` tokens."""
    threads = max(1, threads)
    rounds = max(1, math.ceil(tokens / (threads * max_tile)))
    return max(1, math.ceil(tokens / (threads * rounds)))


def check_execution(execution: str) -> str:
    if execution not in EXECUTIONS:
        raise ValueError(f"execution = {execution!r} is not allowed: allowed values: {', '.join(EXECUTIONS)}")
    return execution


class PackedFFN:
    """fc1 and fc2 of one block, laid out for per-group work (one extra copy of the weights): per group one
    contiguous block, fc1 as (d, G) (one k step of the group's fc1 is one G-wide vector), then fc2 as (G, d) (hidden
    neuron n's contribution to the output is row n). The kernel streams a group's fc1 and fc2 from one place."""

    @torch.no_grad()
    def __init__(self, fc1: nn.Linear, fc2: nn.Linear, group_size: int) -> None:
        hidden, d_model = fc1.weight.shape
        if group_size < 1 or hidden % group_size:
            raise ValueError(f"group_size = {group_size} is not allowed: must divide the FFN width {hidden}")
        self.group_size, self.groups, self.d_model = group_size, hidden // group_size, d_model
        w1g = fc1.weight.detach().view(self.groups, group_size, d_model).transpose(1, 2)
        w2g = fc2.weight.detach().t().reshape(self.groups, group_size, fc2.out_features)
        self.weights = torch.cat([w1g.reshape(self.groups, -1), w2g.reshape(self.groups, -1)], dim=1).contiguous()
        self.b1g = fc1.bias.detach().view(self.groups, group_size).contiguous()
        self.b2 = fc2.bias.detach().contiguous()

    @property
    def w1g(self) -> torch.Tensor:
        """(groups, d, G): a view into `weights`."""
        return self.weights[:, : self.d_model * self.group_size].view(self.groups, self.d_model, self.group_size)

    @property
    def w2g(self) -> torch.Tensor:
        """(groups, G, d): a view into `weights`."""
        return self.weights[:, self.d_model * self.group_size:].view(self.groups, self.group_size, -1)


def sparse_ffn(x: torch.Tensor, open_groups: torch.Tensor, packed: PackedFFN, tile: int | None = None) -> torch.Tensor:
    """fc2(m * relu(fc1 x)), m the per-token group mask `open_groups` (..., groups), skipping closed groups. `tile`:
    the kernel's tokens per tile (default `kernel_tile`; every tile computes the same result)."""
    if open_groups.shape != (*x.shape[:-1], packed.groups):
        raise ValueError(f"group mask of shape {tuple(open_groups.shape)} does not fit tokens {tuple(x.shape[:-1])} "
                         f"and {packed.groups} groups")
    tokens = x.reshape(-1, x.shape[-1]).contiguous()
    mask = open_groups.reshape(-1, packed.groups).to(torch.bool).contiguous()
    kernel = cpu_kernel() if _kernel_applies(tokens, packed) else None
    if kernel is not None:
        y = kernel.gated_ffn(tokens, mask, packed.weights, packed.b1g.view(-1), packed.b2,
                             tile or kernel_tile(tokens.shape[0], torch.get_num_threads()))
    else:
        y = dispatch_ffn(tokens, mask, packed)
    return y.view(*x.shape[:-1], y.shape[-1])


def _kernel_applies(tokens: torch.Tensor, packed: PackedFFN) -> bool:
    return (tokens.device.type == "cpu" and tokens.dtype == torch.float32 and packed.w1g.dtype == torch.float32
            and packed.group_size in KERNEL_GROUP_SIZES)


def dispatch_ffn(tokens: torch.Tensor, mask: torch.Tensor, packed: PackedFFN, grouped_mm: bool | None = None
                 ) -> torch.Tensor:
    """MoE-style dispatch in PyTorch: open (token, group) pairs grouped by group, grouped matmuls, added back.

    grouped_mm: use `torch._grouped_mm` (True) or padded batched matmuls (False); None: the former on CPU.
    """
    if grouped_mm is None:
        grouped_mm = tokens.device.type == "cpu" and hasattr(torch, "_grouped_mm")
    y = packed.b2.to(tokens.dtype).expand(tokens.shape[0], packed.b2.shape[0]).clone()
    # Transposed, nonzero lists the pairs group by group: the order the grouped matmuls need.
    group, token = mask.t().nonzero(as_tuple=True)
    if token.numel() == 0:
        return y
    counts = torch.bincount(group, minlength=packed.groups)
    if grouped_mm:
        offsets = torch.cumsum(counts, 0).to(torch.int32)
        hidden = torch.relu(torch._grouped_mm(tokens[token], packed.w1g, offs=offsets) + packed.b1g[group])
        out = torch._grouped_mm(hidden, packed.w2g, offs=offsets)
    else:
        # Padded batched matmuls: slot of each pair within its group, groups padded to the busiest one.
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(token.numel(), device=tokens.device) - starts[group]
        padded = tokens.new_zeros(packed.groups, int(counts.max()), tokens.shape[1])
        padded[group, slot] = tokens[token]
        hidden = torch.relu(torch.baddbmm(packed.b1g.unsqueeze(1), padded, packed.w1g))
        out = torch.bmm(hidden, packed.w2g)[group, slot]
    return y.index_add_(0, token, out)
