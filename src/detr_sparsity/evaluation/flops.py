"""FLOPs of DETR as actually run, counted by torch.utils.flop_counter on the real model and inputs.

Convention, used in every output: FLOPs = 2 x multiply-accumulates, per image, averaged over the split.
"""

from __future__ import annotations

from torch.utils.flop_counter import FlopCounterMode

FLOPS_CONVENTION = "FLOPs = 2 x multiply-accumulates (torch.utils.flop_counter), per image"


class FlopCount:
    """Counts FLOPs of the whole model and of its FFN blocks over the forward passes run inside it."""

    def __init__(self) -> None:
        self.mode = FlopCounterMode(display=False)
        self.images = 0

    def __enter__(self) -> "FlopCount":
        self.mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.mode.__exit__(*exc)

    def add_images(self, n: int) -> None:
        self.images += n

    def per_image(self) -> dict[str, float]:
        """{'total': whole-model FLOPs, 'ffn': FFN-block FLOPs}, each per image."""
        counts = {name: sum(ops.values()) for name, ops in self.mode.get_flop_counts().items()}
        ffn = sum(v for name, v in counts.items() if name.endswith(".mlp"))
        return {"total": self.mode.get_total_flops() / self.images, "ffn": ffn / self.images}
