"""Statistics of the layers a generation's tokens were decoded from (no MLX needed).

The one place the per-token figures are computed, for results, eval records, reports and
the server's summaries: the non-final share, the depth below the final layer (its mean and
its histogram), the share of tokens the strategy changed (the token differs from the one the
final layer alone would give) and the vocabulary-head rows spent beyond the final layer's.
The figures published for a strategy sit beside them in :data:`PUBLISHED`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


def layer_stats(layers: Sequence[int], final_layer: int) -> tuple[float | None, float | None]:
    """(share of tokens from a layer below ``final_layer``, mean ``final_layer - layer``);
    (None, None) for no tokens."""
    if not layers:
        return None, None
    below = [final_layer - layer for layer in layers]
    return sum(d > 0 for d in below) / len(below), sum(below) / len(below)


def depth_histogram(depths: Iterable[int]) -> dict[int, int]:
    """Tokens per depth below the final layer (0 = the final layer), by increasing depth."""
    return dict(sorted(Counter(depths).items()))


@dataclass(frozen=True)
class Published:
    """Per-token figures a paper reports for a strategy (shares are fractions of tokens)."""

    non_final_share: float
    changed_share: float
    extra_head_rows: float
    source: str


CONFIDENT_PAPER = "Zhang et al. 2026, arXiv 2606.21906"

# By registered strategy name: the figures its paper gives, averaged over its models.
PUBLISHED: dict[str, Published] = {
    "confident": Published(
        non_final_share=0.115, changed_share=0.0247, extra_head_rows=0.116, source=CONFIDENT_PAPER
    ),
}


@dataclass(frozen=True)
class TokenStats:
    """Per-token figures over a set of generated tokens.

    Attributes:
        tokens: tokens counted.
        non_final_share: share decoded from a layer below the final one.
        mean_depth: mean number of layers below the final one.
        depth_histogram: tokens per depth below the final layer (0 = final).
        changed: tokens whose chosen token differs from the final layer's (None: unknown,
            e.g. records written before this was recorded).
        changed_share: ``changed`` over the tokens it was recorded for.
        extra_head_rows: vocabulary-head rows per token beyond the final layer's one.
    """

    tokens: int = 0
    non_final_share: float | None = None
    mean_depth: float | None = None
    depth_histogram: dict[int, int] = field(default_factory=dict)
    changed: int | None = None
    changed_share: float | None = None
    extra_head_rows: float | None = None

    def to_dict(self) -> dict:
        """Plain JSON (histogram keys become strings)."""
        return {
            "tokens": self.tokens,
            "non_final_share": self.non_final_share,
            "mean_depth": self.mean_depth,
            "depth_histogram": {str(k): v for k, v in self.depth_histogram.items()},
            "changed": self.changed,
            "changed_share": self.changed_share,
            "extra_head_rows": self.extra_head_rows,
        }


class TokenTally:
    """Adds up generations (or eval records) into one :class:`TokenStats`.

    Each :meth:`add` brings the depths of one generation's tokens and, when known, how many
    of them changed and how many head rows they cost; shares are taken over the tokens whose
    figure is known, so records with and without the newer figures mix.
    """

    def __init__(self) -> None:
        self.depths: Counter[int] = Counter()
        self.changed = self.changed_tokens = 0
        self.head_rows = self.head_tokens = 0

    def add(
        self, depths: Sequence[int], changed: int | None = None, head_rows: int | None = None
    ) -> None:
        self.depths.update(depths)
        if changed is not None:
            self.changed += changed
            self.changed_tokens += len(depths)
        if head_rows is not None:
            self.head_rows += head_rows
            self.head_tokens += len(depths)

    def stats(self) -> TokenStats:
        tokens = sum(self.depths.values())
        if not tokens:
            return TokenStats()
        below = sum(n for depth, n in self.depths.items() if depth > 0)
        known = self.changed_tokens > 0
        return TokenStats(
            tokens=tokens,
            non_final_share=below / tokens,
            mean_depth=sum(depth * n for depth, n in self.depths.items()) / tokens,
            depth_histogram=dict(sorted(self.depths.items())),
            changed=self.changed if known else None,
            changed_share=self.changed / self.changed_tokens if known else None,
            extra_head_rows=(
                (self.head_rows - self.head_tokens) / self.head_tokens if self.head_tokens else None
            ),
        )


def token_stats(
    layers: Sequence[int],
    final_layer: int,
    changed: Sequence[bool | None] | None = None,
    head_rows: Sequence[int] | None = None,
) -> TokenStats:
    """The figures of one generation from its per-token lists (a ``None`` in ``changed``
    makes the changed count unknown)."""
    tally = TokenTally()
    known = changed is not None and None not in changed
    tally.add(
        [final_layer - layer for layer in layers],
        sum(bool(c) for c in changed) if known else None,
        None if head_rows is None else sum(head_rows),
    )
    return tally.stats()
