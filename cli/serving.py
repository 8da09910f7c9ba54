"""`dycoke serve` (the model stays loaded behind an OpenAI-compatible API), `dycoke chat` (a conversation
about one video) and the `--server` client path of `dycoke ask`."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

from cli import options as o
from cli.common import check_video_path, fail, load_for_video, write
from dycoke.config import DEFAULT_MODEL, ModelOptions, RunOptions
from dycoke.errors import ConfigError, DyCokeError


def run_remote(
    video: str,
    turns: list[tuple[str, str]],
    server: str,
    api_key: str | None,
    options: RunOptions,
    upload: bool,
    as_json: bool,
) -> Any:
    """Ask a running `dycoke serve`: the answer streams to stdout (unless --json); returns its report."""
    from cli.client import ServerClient

    report = ServerClient(server, api_key).ask(video, turns, options, upload=upload, on_text=None if as_json else write)
    if not as_json:
        write("\n")
    return report


def serve(
    model: o.Model = DEFAULT_MODEL,
    device: o.Device = "auto",
    dtype: o.Dtype = "auto",
    host: Annotated[str, typer.Option(help="Address to listen on (loopback unless told otherwise).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8765,
    allowed_local_media_path: Annotated[
        list[Path] | None,
        typer.Option(help="A folder whose videos file:// URLs may name (repeatable); none: local files refused."),
    ] = None,
    max_upload_mb: Annotated[float, typer.Option(help="Largest video a data: URL may carry.")] = 512.0,
    cache_gb: Annotated[float, typer.Option(help="Memory for prepared videos kept between requests (0: none).")] = 4.0,
    api_key: Annotated[
        str | None, typer.Option(envvar="DYCOKE_API_KEY", help="Require 'Authorization: Bearer KEY'.")
    ] = None,
    max_batch_size: Annotated[int, typer.Option(help="Requests on the same video answered together.")] = 8,
    batch_wait_ms: Annotated[
        float, typer.Option(help="With concurrent clients, wait this long for more questions before a batch.")
    ] = 20.0,
    frames: Annotated[int, typer.Option("--frames", "-f", help="Frames of a request that sets none.")] = 32,
    warmup: Annotated[bool, typer.Option(help="Answer one short question before listening (GPU only).")] = True,
) -> None:
    """Keep a model loaded and answer an OpenAI-compatible API: POST /v1/chat/completions with a video_url
    part, GET /v1/models, GET /health. Stops cleanly on Ctrl-C or SIGTERM."""
    from dycoke.config import VideoOptions

    try:
        from dycoke.server.settings import ServerSettings

        settings = ServerSettings(
            model=model,
            device=device,
            dtype=dtype,
            host=host,
            port=port,
            allowed_local_media_paths=tuple(allowed_local_media_path or ()),
            max_upload_mb=max_upload_mb,
            cache_gb=cache_gb,
            api_key=api_key,
            max_batch_size=max_batch_size,
            batch_wait_ms=batch_wait_ms,
            defaults=RunOptions(video=VideoOptions(num_frames=frames)),
            warmup=warmup,
        )
        from dycoke.server.app import serve as run_server

        run_server(settings)
    except DyCokeError as exc:
        fail(exc)
    except KeyboardInterrupt:  # Ctrl-C while the model loads
        raise typer.Exit(130) from None


CHAT_HELP = "/reset forgets the conversation, /method NAME switches method, /quit ends (so does Ctrl-D)"


def chat(
    video: Annotated[str, typer.Argument(help="The video to talk about.")],
    model: o.Model = DEFAULT_MODEL,
    device: o.Device = "auto",
    dtype: o.Dtype = "auto",
    frames: o.Frames = 32,
    seek: o.Seek = "exact",
    method: o.MethodName = "dycoke",
    merge_ratio: o.MergeRatio = 0.7,
    prune_layer: o.PruneLayer = 3,
    prune_ratio: o.PruneRatio = 0.7,
    max_new_tokens: o.MaxNewTokens = 256,
    server: o.Server = None,
    api_key: o.ApiKey = None,
    upload: o.Upload = False,
) -> None:
    """Talk about VIDEO, several turns: the video is read and encoded once; each question continues the
    conversation. In-process, or with a running `dycoke serve` (--server)."""
    from dycoke.config import GenerationOptions, MethodOptions, VideoOptions

    try:
        model_options = ModelOptions(model=model, device=device, dtype=dtype)
        options = RunOptions(
            video=VideoOptions(num_frames=frames, seek=seek),
            generation=GenerationOptions(max_new_tokens=max_new_tokens),
            method=MethodOptions(
                method=method,  # type: ignore[arg-type]
                merge_ratio=merge_ratio,
                prune_layer=prune_layer,
                prune_ratio=prune_ratio,
            ),
        )
        check_video_path(video)
        if server:
            from cli.client import ServerClient

            client = ServerClient(server, api_key)

            def answer(turns: list[tuple[str, str]], run: RunOptions) -> Any:
                return client.ask(video, turns, run, upload=upload, on_text=write)

        else:
            qa, decoded, _ = load_for_video(video, model_options, options)
            prepared = qa.prepare(decoded, options.video)

            def answer(turns: list[tuple[str, str]], run: RunOptions) -> Any:
                run.method.check_against_model(qa.loaded.num_layers)
                return qa.answer_many(prepared, [turns], run, on_texts=[write])[0]

        _chat_loop(answer, options)
    except DyCokeError as exc:
        fail(exc)
    except KeyboardInterrupt:
        typer.echo("", err=True)


def _chat_loop(answer: Any, options: RunOptions) -> None:
    """Read questions from stdin until /quit or end of input; answers stream to stdout."""
    from cli.render import console

    turns: list[tuple[str, str]] = []
    console.print(f"[dim]{CHAT_HELP}[/]", highlight=False)
    while True:
        sys.stderr.write("you> ")
        sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:
            sys.stderr.write("\n")
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return
        if text == "/reset":
            turns = []
            console.print("[dim]conversation reset[/]", highlight=False)
            continue
        if text.startswith("/method"):
            name = text.removeprefix("/method").strip()
            try:
                options = replace(options, method=replace(options.method, method=name))  # type: ignore[arg-type]
            except ConfigError as exc:
                console.print(f"[red]Error:[/] {exc}", highlight=False)
                continue
            console.print(f"[dim]method: {name}[/]", highlight=False)
            continue
        if text.startswith("/"):
            console.print(f"[dim]{CHAT_HELP}[/]", highlight=False)
            continue
        try:
            report = answer([*turns, ("user", text)], options)
        except DyCokeError as exc:
            console.print(f"\n[red]Error:[/] {exc}", highlight=False)
            continue
        write("\n")
        turns += [("user", text), ("assistant", report.answer)]
        t = report.timings_s
        console.print(
            f"[dim]{report.method} · {report.tokens.visual} visual tokens · {report.tokens.generated} tokens in "
            f"{t.total:.2f} s[/]",
            highlight=False,
        )
