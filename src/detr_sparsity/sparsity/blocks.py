"""Names of DETR's FFN blocks ('encoder.<i>', 'decoder.<i>') and of masking scopes, and their order.

Kept free of torch so that light stages (the summary) can order rows without importing the model code.
"""

from __future__ import annotations

# The masking scope that masks every FFN block at once; any other scope is one block's name.
ALL_BLOCKS = "all"


def block_order(name: str) -> tuple[int, int]:
    """Sort key: encoder blocks first, then decoder, each by depth."""
    kind, index = name.split(".")
    return (0 if kind == "encoder" else 1, int(index))


def scope_order(scope: str) -> tuple[int, int]:
    """Sort key: all blocks first, then each block in block order."""
    return (-1, 0) if scope == ALL_BLOCKS else block_order(scope)
