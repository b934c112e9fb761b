"""FLOPs of DETR: dense counts from torch.utils.flop_counter on the real model and inputs, and what a method
saves from the masks it actually applied (counted by the FFN wrappers), with its own overhead added back.

Convention, used in every output: FLOPs = 2 x multiply-accumulates, per image, averaged over the split.
FFN figures cover real tokens only (the counter's FFN counts are scaled by each block's real-token fraction,
exact because FFN work is linear in tokens); the rest of the model is counted as run on the padded batch.
"""

from __future__ import annotations

from torch.utils.flop_counter import FlopCounterMode

from detr_sparsity.sparsity.ffn import FFNSparsity

FLOPS_CONVENTION = "FLOPs = 2 x multiply-accumulates (torch.utils.flop_counter), per image"


class FlopCount:
    """Counts FLOPs of every module over the forward passes run inside it.

    On exit the counts become plain integers per module (`module_flops`), which shards of one evaluation sum
    exactly (evaluation.shards).
    """

    def __init__(self) -> None:
        self.mode = FlopCounterMode(display=False)
        self.images = 0
        self.module_flops: dict[str, int] = {}

    def __enter__(self) -> "FlopCount":
        self.mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.mode.__exit__(*exc)
        self.module_flops = {module: int(sum(ops.values())) for module, ops in self.mode.get_flop_counts().items()}

    def add_images(self, n: int) -> None:
        self.images += n

    def total(self) -> int:
        return self.module_flops.get("Global", 0)  # FlopCounterMode's name for the whole run

    def block(self, name: str) -> int:
        """Counted FLOPs of one FFN block's fc1 and fc2 ('encoder.0', ...), padding included.

        Only fc1 and fc2: whatever a policy itself runs inside the wrapper (a gate) is its overhead, added
        separately, so the dense figure is the same for every method.
        """
        kind, index = name.split(".")
        prefix = f".model.{kind}.layers.{index}.mlp.block."
        return sum(flops for module, flops in self.module_flops.items()
                   if module.endswith((prefix + "fc1", prefix + "fc2")))


def flops_per_image(count: FlopCount, sparsity: FFNSparsity) -> dict[str, dict[str, float]]:
    """{'ffn': {'dense', 'as_run'}, 'total': {'dense', 'as_run'}}, FLOPs per image.

    as_run = dense - 2 x (multiply-accumulates the masks skipped - those the policies added).
    """
    if count.images == 0:
        raise ValueError("no images were counted")
    counted_ffn = ffn_dense = saved = 0.0
    for name, block in sparsity.blocks.items():
        counted = count.block(name)
        counted_ffn += counted
        ffn_dense += counted * sparsity.real_token_fraction(name)
        saved += 2 * (block.skipped_macs() - block.overhead_macs())
    total_dense = count.total() - counted_ffn + ffn_dense
    n = count.images
    return {
        "ffn": {"dense": ffn_dense / n, "as_run": (ffn_dense - saved) / n},
        "total": {"dense": total_dense / n, "as_run": (total_dense - saved) / n},
    }
