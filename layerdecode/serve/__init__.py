"""``layerdecode serve``: an OpenAI-compatible HTTP server with a strategy per request.

:mod:`.schemas` validates requests, :mod:`.engine` runs every MLX call on one generation
thread (continuous batches, one per strategy), :mod:`.app` is the Starlette app, and
``static/playground.html`` is the playground page served at ``/``.
"""

from __future__ import annotations

from .app import ServerConfig, create_app
from .engine import Engine

__all__ = ["Engine", "ServerConfig", "create_app"]
