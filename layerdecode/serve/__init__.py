"""``layerdecode serve``: an OpenAI-compatible HTTP server with a strategy per request.

:mod:`.schemas` validates requests, :mod:`.worker` runs every MLX call on one generation
thread (one decoding engine per model, whose rows mix strategies), :mod:`.app` is the
Starlette app, and
``static/playground.html`` is the playground page served at ``/``.
"""

from __future__ import annotations

from .app import ServerConfig, create_app
from .worker import Worker

__all__ = ["ServerConfig", "Worker", "create_app"]
