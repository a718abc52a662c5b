"""Bebop rollout server: OpenAI + SGLang-native HTTP API over a serving backend, hot weight
sync (disk / HTTP safetensors / torch.distributed group), Prometheus metrics.

    bebop serve --model DIR        # see bebop_spec/server/cli.py;  docs/server.md for the endpoints

Layers (STYLE §8): `protocol/` pydantic models -> `serving/` request-to-engine logic ->
`routes/` thin FastAPI routes; `app.build_app(engine, ServerConfig)` wires them.
"""

from bebop_spec import __version__

__all__ = ["__version__"]
