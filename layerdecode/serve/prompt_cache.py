"""Reused prompt caches: the longest cached prefix of a request's tokens, as mlx_lm.server.

mlx-lm's :class:`~mlx_lm.models.cache.LRUPromptCache` keeps the caches of finished
requests in a trie, bounded in entries and bytes, and finds the nearest one for a new
prompt (a shorter prefix, or a longer entry trimmed back to the common prefix). Only the
rest of the prompt is then prefilled. Prefill is not tapped, so a reused prefix gives the
same tokens and layers as a cold run.

Used from the generation thread only.
"""

from __future__ import annotations

from typing import Any

from mlx_lm.models.cache import LRUPromptCache, can_trim_prompt_cache, trim_prompt_cache


class PromptCache:
    """Caches of earlier requests, per served model.

    Args:
        max_entries: caches kept (0: none: every prompt is prefilled in full).
        max_bytes: their total size in bytes (``None``: no bound but the entries').
    """

    def __init__(self, max_entries: int = 10, max_bytes: int | None = None) -> None:
        self.enabled = max_entries > 0
        self.lru = LRUPromptCache(max_size=max(max_entries, 1), max_bytes=max_bytes or 1 << 62)

    def fetch(self, model: str, tokens: list[int]) -> tuple[list[Any] | None, int]:
        """A copy of the cache of the longest known prefix of ``tokens`` and its length
        (``None, 0`` when there is none). At least the last token is left to decode."""
        if not self.enabled or len(tokens) < 2:
            return None, 0
        cache, rest = self.lru.fetch_nearest_cache(model, tokens)
        if cache is None:
            return None, 0
        cached = len(tokens) - len(rest)
        if cached == len(tokens):  # the whole prompt: decode its last token again
            if not can_trim_prompt_cache(cache):
                return None, 0
            trim_prompt_cache(cache, 1)
            cached -= 1
        if cached <= 0:
            return None, 0
        return cache, cached

    def keep(self, model: str, tokens: list[int], cache: list[Any]) -> None:
        """Remember ``cache``, which holds ``tokens``."""
        if self.enabled and tokens:
            self.lru.insert_cache(model, tokens, cache)

    def stats(self) -> dict[str, int]:
        return {"entries": len(self.lru), "bytes": self.lru.nbytes}
