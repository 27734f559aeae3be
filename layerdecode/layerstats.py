"""Statistics of the layers a generation's tokens were decoded from (no MLX needed).

The one place the non-final share and the mean depth below the final layer are computed,
for results, eval records and the server's summaries.
"""

from __future__ import annotations

from collections.abc import Sequence


def layer_stats(layers: Sequence[int], final_layer: int) -> tuple[float | None, float | None]:
    """(share of tokens from a layer below ``final_layer``, mean ``final_layer - layer``);
    (None, None) for no tokens."""
    if not layers:
        return None, None
    below = [final_layer - layer for layer in layers]
    return sum(d > 0 for d in below) / len(below), sum(below) / len(below)
