"""``dycoke serve``: one resident model behind an OpenAI-compatible API (as ``vllm serve``).

    from dycoke.server import ServerSettings, serve
    serve(ServerSettings(model="llava-hf/llava-onevision-qwen2-7b-ov-hf", allowed_local_media_paths=(Path("videos"),)))

Clients use any OpenAI client: the video is a ``video_url`` content part (``file://`` under an allowed
folder, or ``data:video/mp4;base64,...``), DyCoke's options go in the request body (``extra_body``),
and every answer carries the run's report in a ``dycoke`` field. The command is ``dycoke serve``
(``cli/serving.py``).

Importing this package loads the web framework but not torch: the model loads in ``serve``.
"""

from __future__ import annotations

from dycoke.server.app import ServerError, build_engine, create_app, serve, warm_up
from dycoke.server.engine import Engine
from dycoke.server.settings import ServerSettings

__all__ = ["Engine", "ServerError", "ServerSettings", "build_engine", "create_app", "serve", "warm_up"]
