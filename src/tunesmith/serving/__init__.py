"""Serving what was trained: an OpenAI-compatible HTTP server and a terminal chat, both on the
batched generation engine (`engine.py`)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .protocol import Limits


def build_app(source: str, *, adapters: dict[str, str | Path] | list[str] | None = None, api_key: str | None = None,
              dtype: str = "fp32", lazy: bool = False, name: str | None = None, limits: Limits | None = None):
    """The FastAPI app serving `source` (a model or a run) and named adapters on it."""
    from .app import create_app
    from .models import load_served, parse_adapters

    pairs = parse_adapters(adapters) if isinstance(adapters, list) else {k: Path(v) for k, v in (adapters or {}).items()}
    served = load_served(str(source), pairs, dtype=dtype, lazy=lazy, name=name)
    return create_app(served, api_key=api_key, limits=limits)


def serve(source: str, *, adapters: dict[str, str | Path] | list[str] | None = None, host: str = "127.0.0.1",
          port: int = 8000, api_key: str | None = None, dtype: str = "fp32", lazy: bool = False,
          name: str | None = None, limits: Limits | None = None, echo: Callable[[str], None] = print) -> None:
    """Serve until interrupted (binds 127.0.0.1 unless `host` says otherwise)."""
    try:
        import uvicorn
    except ImportError as exc:
        from ..errors import ConfigError

        raise ConfigError("serve needs the server extra: pip install 'tunesmith[serve]'") from exc
    app = build_app(source, adapters=adapters, api_key=api_key, dtype=dtype, lazy=lazy, name=name, limits=limits)
    served = app.state.served
    echo(f"serving {', '.join(served.names)} on http://{host}:{port}/v1"
         + (" (API key required)" if api_key else "") + (" — reachable from other machines" if host != "127.0.0.1"
                                                          else ""))
    uvicorn.run(app, host=host, port=port, log_level="warning")


__all__ = ["Limits", "build_app", "serve"]
