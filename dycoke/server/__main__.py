"""``python -m dycoke.server --model M [--port 8765] ...``: the server without the command line's other
commands (``dycoke serve`` takes the same options). Exit code 0 after SIGTERM/Ctrl-C, 2 for an
impossible option value, 1 when the server cannot start (address taken, model not found, ...)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from dycoke.config import DEFAULT_MODEL, RunOptions, VideoOptions
from dycoke.errors import ConfigError, DyCokeError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dycoke.server", description=__doc__)
    parser.add_argument("--model", "-m", default=DEFAULT_MODEL, help="hub id or local checkpoint directory")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument(
        "--allowed-local-media-path",
        action="append",
        default=[],
        metavar="DIR",
        help="a folder whose videos file:// URLs may name (repeatable)",
    )
    parser.add_argument("--max-upload-mb", type=float, default=512.0, help="largest data: URL video")
    parser.add_argument("--cache-gb", type=float, default=4.0, help="memory for prepared videos (0: none)")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("DYCOKE_API_KEY"),
        help="require 'Authorization: Bearer KEY' (env DYCOKE_API_KEY)",
    )
    parser.add_argument("--max-batch-size", type=int, default=8, help="requests answered together")
    parser.add_argument("--frames", type=int, default=None, help="default frames of a request that sets none")
    parser.add_argument("--no-warmup", action="store_true", help="skip the warm-up answer")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        from dycoke.server.settings import ServerSettings

        defaults = RunOptions() if args.frames is None else RunOptions(video=VideoOptions(num_frames=args.frames))
        settings = ServerSettings(
            model=args.model,
            device=args.device,
            dtype=args.dtype,
            host=args.host,
            port=args.port,
            allowed_local_media_paths=tuple(Path(p) for p in args.allowed_local_media_path),
            max_upload_mb=args.max_upload_mb,
            cache_gb=args.cache_gb,
            api_key=args.api_key,
            max_batch_size=args.max_batch_size,
            defaults=defaults,
            warmup=not args.no_warmup,
        )
        from dycoke.server.app import serve

        serve(settings)
    except ConfigError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    except DyCokeError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C while the model loads
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
