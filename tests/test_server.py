"""``dycoke serve``: a real server process on a loopback port, driven with the official OpenAI client and
httpx; then unit tests of the error mapping and of the engine's batching and cancellation (a fake model).

Out of GPU memory cannot be produced on a CPU: the 503 it maps to is tested on the mapping and through
the app with a fake model that raises the library's ``OutOfMemoryError``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from tests.server_helpers import FakeQA, ServerProcess, parse_sse, user, video_part
from tests.videos import textured_frames, write_video

KEY = "test-key-123"
NEW = 8  # answer tokens of most requests
OPTS = {"num_frames": 4}  # extra_body of most requests
QUESTIONS = ["What moves?", "What colour is the background?", "Is there a person?", "Describe the scene briefly."]


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Videos under the allowed folder, and things around it that must stay out of reach."""
    root = tmp_path_factory.mktemp("server-media")
    allowed, outside = root / "allowed", root / "outside"
    allowed.mkdir()
    outside.mkdir()
    paths = {
        "allowed": allowed,
        "clip": write_video(allowed / "clip.mp4", textured_frames(16, 96, 128, seed=1), fps=8),
        "follow": write_video(allowed / "follow up.mp4", textured_frames(16, 96, 128, seed=2), fps=8),
        "multi": write_video(allowed / "multi.mp4", textured_frames(16, 96, 128, seed=3), fps=8),
        "upload": write_video(root / "upload.mp4", textured_frames(8, 64, 96, seed=4), fps=8),
        "secret": write_video(outside / "secret.mp4", textured_frames(8, 64, 96, seed=5), fps=8),
    }
    (allowed / "notes.mp4").write_text("this is not a video\n" * 50)
    data = paths["clip"].read_bytes()
    (allowed / "damaged.mp4").write_bytes(data[: len(data) // 3])
    (allowed / "escape.mp4").symlink_to(paths["secret"])
    paths["notes"], paths["damaged"], paths["escape"] = (
        allowed / "notes.mp4",
        allowed / "damaged.mp4",
        allowed / "escape.mp4",
    )
    return paths


@pytest.fixture(scope="module")
def servers(
    tiny_checkpoint: Path, media: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, ServerProcess]]:
    """The server most tests use (API key, 1 MB uploads), and a spare one for the SIGTERM test,
    started together so that their start-ups overlap; both are always terminated."""
    logs = tmp_path_factory.mktemp("server-logs")
    common = ["--allowed-local-media-path", str(media["allowed"]), "--max-upload-mb", "1", "--cache-gb", "1"]
    started = {
        "main": ServerProcess(tiny_checkpoint, logs / "main.log", *common, api_key=KEY),
        "spare": ServerProcess(tiny_checkpoint, logs / "spare.log", *common),
    }
    try:
        for server in started.values():
            server.wait_ready()
        yield started
    finally:
        for server in started.values():
            server.stop()


@pytest.fixture(scope="module")
def server(servers: dict[str, ServerProcess]) -> ServerProcess:
    return servers["main"]


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> OpenAI:
    return OpenAI(base_url=f"{server.base}/v1", api_key=KEY, timeout=60.0, max_retries=0)


@pytest.fixture(scope="module")
def model(client: OpenAI) -> str:
    return client.models.list().data[0].id


def ask(client: OpenAI, model: str, url: str, question: str, **extra: Any) -> dict[str, Any]:
    """One greedy non-streaming answer, as a plain dict (``dycoke`` field included)."""
    response = client.chat.completions.create(
        model=model,
        messages=[user(url, question)],  # type: ignore[list-item]
        max_tokens=extra.pop("max_tokens", NEW),
        temperature=0,
        extra_body={**OPTS, **extra},
    )
    return response.to_dict()


def stream(client: OpenAI, model: str, url: str, question: str, **extra: Any) -> tuple[str, list[Any]]:
    """One greedy streaming answer: its text and its chunks."""
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=[user(url, question)],  # type: ignore[list-item]
            max_tokens=NEW,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={**OPTS, **extra},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def post(server: ServerProcess, body: Any, *, raw: bytes | None = None, key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = raw if raw is not None else json.dumps(body).encode()
    headers["Content-Type"] = "application/json"
    return httpx.post(f"{server.base}/v1/chat/completions", content=content, headers=headers, timeout=60.0)


# -- the server process ----------------------------------------------------------------------------


def test_health_and_models(server: ServerProcess, client: OpenAI, tiny_checkpoint: Path) -> None:
    health = server.health()
    assert health["status"] == "ok" and health["model"] == str(tiny_checkpoint) and health["queue"] == 0
    models = client.models.list().data
    assert [m.id for m in models] == [str(tiny_checkpoint)]


def test_answer(client: OpenAI, model: str, media: dict[str, Path]) -> None:
    out = ask(client, model, media["clip"].as_uri(), QUESTIONS[0])
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-") and out["model"] == model
    choice = out["choices"][0]
    report = out["dycoke"]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == report["answer"]
    assert out["usage"] == {
        "prompt_tokens": report["tokens"]["prompt"],
        "completion_tokens": report["tokens"]["generated"],
        "total_tokens": report["tokens"]["prompt"] + report["tokens"]["generated"],
    }
    assert choice["finish_reason"] == ("length" if report["tokens"]["generated"] >= NEW else "stop")
    assert report["method"] == "dycoke" and report["tokens"]["frames"] == 4
    assert report["video_cache"] in ("hit", "miss") and report["video"]["path"] == str(media["clip"])
    assert report["options"]["generation"]["max_new_tokens"] == NEW


def test_options_from_extra_body_change_the_run(client: OpenAI, model: str, media: dict[str, Path]) -> None:
    full = ask(client, model, media["clip"].as_uri(), QUESTIONS[0], method="full", num_frames=6)["dycoke"]
    assert full["method"] == "full" and full["tokens"]["frames"] == 6
    assert full["tokens"]["visual"] == full["tokens"]["visual_uncompressed"]
    merged = ask(client, model, media["clip"].as_uri(), QUESTIONS[0], merge_ratio=0.5, num_frames=6)["dycoke"]
    assert merged["options"]["method"]["merge_ratio"] == 0.5
    assert merged["tokens"]["visual"] < full["tokens"]["visual"]


def test_streaming_gives_the_non_streaming_answer(
    client: OpenAI, model: str, server: ServerProcess, media: dict[str, Path]
) -> None:
    url = media["clip"].as_uri()
    expected = ask(client, model, url, QUESTIONS[1])
    text, chunks = stream(client, model, url, QUESTIONS[1])
    assert text == expected["choices"][0]["message"]["content"]
    assert chunks[0].choices[0].delta.role == "assistant"
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(final) == 1 and final[0].choices[0].finish_reason == expected["choices"][0]["finish_reason"]
    report = final[0].to_dict()["dycoke"]
    assert report["answer"] == text and report["token_ids"] == expected["dycoke"]["token_ids"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == expected["usage"]["completion_tokens"]
    assert len({c.id for c in chunks}) == 1

    # the raw events: one data line each, [DONE] last
    body = {
        "model": model,
        "messages": [user(url, QUESTIONS[1])],
        "max_tokens": NEW,
        "stream": True,
        **OPTS,
    }
    with httpx.stream(
        "POST", f"{server.base}/v1/chat/completions", json=body, headers=server.headers, timeout=60.0
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events, done = parse_sse(raw)
    assert done and raw.rstrip().endswith("data: [DONE]")
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == text
    assert "dycoke" in events[-1] and "usage" not in events[-1]


def test_multi_turn_conversation(client: OpenAI, model: str, server: ServerProcess, media: dict[str, Path]) -> None:
    url = media["clip"].as_uri()
    messages = [
        {"role": "system", "content": "You answer in one word."},
        user(url, "What is shown?"),
        {"role": "assistant", "content": "Patterns."},
        {"role": "user", "content": "And which colours?"},
    ]
    out = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=NEW,
        temperature=0,
        extra_body=OPTS,  # type: ignore[arg-type]
    ).to_dict()
    report = out["dycoke"]
    assert report["question"] == "And which colours?"
    assert report["options"]["prompt"]["system_prompt"] == "You answer in one word."
    single = ask(client, model, url, "And which colours?")["dycoke"]
    assert report["tokens"]["prompt"] > single["tokens"]["prompt"]  # the earlier turns are in the prompt
    assert out["choices"][0]["message"]["content"] == report["answer"]

    # the video must come with the first user message
    late = [user(None, "Hello"), {"role": "assistant", "content": "Hi."}, user(url, "What is shown?")]
    response = post(server, {"model": model, "messages": late, **OPTS})
    assert response.status_code == 400 and "first user message" in response.json()["error"]["message"]


def test_sampling_with_a_seed_is_reproducible(client: OpenAI, model: str, media: dict[str, Path]) -> None:
    def sample(seed: int) -> dict[str, Any]:
        return client.chat.completions.create(
            model=model,
            messages=[user(media["clip"].as_uri(), QUESTIONS[0])],  # type: ignore[list-item]
            max_completion_tokens=NEW,
            temperature=1.5,
            top_p=0.9,
            seed=seed,
            extra_body=OPTS,
        ).to_dict()

    first, again = sample(7), sample(7)
    generation = first["dycoke"]["options"]["generation"]
    assert generation["do_sample"] and generation["temperature"] == 1.5 and generation["top_p"] == 0.9
    assert first["dycoke"]["token_ids"] == again["dycoke"]["token_ids"]
    assert first["dycoke"]["decoder"] == "hf"


def test_follow_up_on_the_same_video_skips_its_preparation(
    client: OpenAI, model: str, server: ServerProcess, media: dict[str, Path]
) -> None:
    url = media["follow"].as_uri()  # a name with a space: percent-encoded in the URL
    first = ask(client, model, url, QUESTIONS[0])["dycoke"]
    second = ask(client, model, url, QUESTIONS[1])["dycoke"]
    assert first["video_cache"] == "miss" and second["video_cache"] == "hit"
    assert first["timings_s"]["video_decode"] > 0 and first["timings_s"]["vision_encoder"] > 0
    assert second["timings_s"]["video_decode"] == 0 and second["timings_s"]["vision_encoder"] == 0
    assert second["timings_s"]["shared_prefix"] == 0  # the prefix KV was memoised with the video
    assert first["timings_s"]["shared_prefix"] > 0
    assert second["timings_s"]["total"] < first["timings_s"]["total"]
    other_frames = ask(client, model, url, QUESTIONS[1], num_frames=5)["dycoke"]
    assert other_frames["video_cache"] == "miss"  # other frames: another prepared video
    cache = server.health()["engine"]["cache"]
    assert cache["entries"] >= 2 and 0 < cache["bytes"] <= 2**30


def test_eight_clients_four_questions_each(
    client: OpenAI, model: str, server: ServerProcess, media: dict[str, Path]
) -> None:
    url = media["multi"].as_uri()
    alone = {q: ask(client, model, url, q)["choices"][0]["message"]["content"] for q in QUESTIONS}
    before = server.health()["engine"]["largest_batch"]

    def one_client(index: int) -> list[tuple[str, str]]:
        own = OpenAI(base_url=f"{server.base}/v1", api_key=KEY, timeout=120.0, max_retries=0)
        answers = []
        for q in QUESTIONS[index % 4 :] + QUESTIONS[: index % 4]:
            if index % 2:  # half the clients stream: their pieces never mix with another request's
                text, _ = stream(own, model, url, q)
            else:
                text = ask(own, model, url, q)["choices"][0]["message"]["content"]
            answers.append((q, text))
        return answers

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(one_client, range(8), timeout=180))
    got = [pair for answers in results for pair in answers]
    assert len(got) == 32
    assert all(text == alone[q] for q, text in got), [(q, t, alone[q]) for q, t in got if t != alone[q]]
    health = server.health()
    assert health["queue"] == 0
    assert health["engine"]["largest_batch"] >= max(before, 2)  # requests on one video were batched


BAD_REQUESTS: list[tuple[str, Any, int, str]] = [
    ("not json", b"{bad json", 400, "invalid_json"),
    ("not an object", [1, 2], 400, "invalid_json"),
    ("no messages", {}, 400, "invalid_messages"),
    ("no video", {"messages": [user(None, "What?")]}, 400, "no_video"),
    ("no question", {"messages": [user("CLIP", None)]}, 400, "no_question"),
    ("assistant last", {"messages": [user("CLIP", "Q"), {"role": "assistant", "content": "A"}]}, 400, "no_question"),
    ("two videos", {"messages": [{"role": "user", "content": [video_part("CLIP"), video_part("CLIP")]}]}, 400, ""),
    (
        "image part",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        400,
        "",
    ),
    ("http url", {"messages": [user("https://example.com/v.mp4", "Q")]}, 400, "unsupported_url"),
    ("relative file url", {"messages": [user("file:clip.mp4", "Q")]}, 400, "invalid_url"),
    ("missing file", {"messages": [user("ALLOWED/nothing-here.mp4", "Q")]}, 404, "video_not_found"),
    ("outside, exists", {"messages": [user("SECRET", "Q")]}, 403, "forbidden_path"),
    ("outside, missing", {"messages": [user("OUTSIDE/none.mp4", "Q")]}, 403, "forbidden_path"),
    ("dot-dot escape", {"messages": [user("ALLOWED/../outside/secret.mp4", "Q")]}, 403, "forbidden_path"),
    ("symlink escape", {"messages": [user("ESCAPE", "Q")]}, 403, "forbidden_path"),
    ("folder", {"messages": [user("ALLOWED", "Q")]}, 400, "invalid_video"),
    ("not a video", {"messages": [user("NOTES", "Q")]}, 400, "invalid_video"),
    ("damaged video", {"messages": [user("DAMAGED", "Q")]}, 400, "invalid_video"),
    ("option out of range", {"messages": [user("CLIP", "Q")], "merge_ratio": 1.5}, 400, "invalid_option"),
    ("prune layer past the model", {"messages": [user("CLIP", "Q")], "prune_layer": 9}, 400, "invalid_option"),
    ("option of a wrong type", {"messages": [user("CLIP", "Q")], "num_frames": "four"}, 400, "invalid_type"),
    ("unknown field", {"messages": [user("CLIP", "Q")], "merge_ratioo": 0.5}, 400, "unknown_field"),
    ("n=2", {"messages": [user("CLIP", "Q")], "n": 2}, 400, "invalid_value"),
    ("stop sequences", {"messages": [user("CLIP", "Q")], "stop": ["."]}, 400, "unsupported_field"),
    ("temperature 3", {"messages": [user("CLIP", "Q")], "temperature": 3}, 400, "invalid_value"),
    ("max_tokens 0", {"messages": [user("CLIP", "Q")], "max_tokens": 0}, 400, "invalid_value"),
    ("another model", {"messages": [user("CLIP", "Q")], "model": "gpt-4o"}, 404, "model_not_found"),
    ("data url of text", {"messages": [user("data:text/plain;base64,aGk=", "Q")]}, 400, "invalid_url"),
    ("bad base64", {"messages": [user("data:video/mp4;base64,@@@@", "Q")]}, 400, "invalid_base64"),
    ("uploaded non-video", {"messages": [user("data:video/mp4;base64," + "QUJD" * 100, "Q")]}, 400, "invalid_video"),
]


def _fill(value: Any, media: dict[str, Path]) -> Any:
    """Put the test's paths into a request template (CLIP, SECRET, ... as file URLs)."""
    if isinstance(value, dict):
        return {k: _fill(v, media) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, media) for v in value]
    if not isinstance(value, str):
        return value
    names = {
        "CLIP": media["clip"],
        "SECRET": media["secret"],
        "ESCAPE": media["escape"],
        "NOTES": media["notes"],
        "DAMAGED": media["damaged"],
    }
    if value in names:
        return names[value].as_uri()
    for word, folder in (("ALLOWED", media["allowed"]), ("OUTSIDE", media["secret"].parent)):
        if value == word or value.startswith(word + "/"):
            return "file://" + str(folder) + value[len(word) :]
    return value


@pytest.mark.parametrize(("case", "body", "status", "code"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request(
    server: ServerProcess, media: dict[str, Path], case: str, body: Any, status: int, code: str
) -> None:
    if isinstance(body, bytes):
        response = post(server, None, raw=body)
    else:
        body = _fill(body, media)
        if isinstance(body, dict):
            body = {"max_tokens": 4, **OPTS, **body}
        response = post(server, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code"} and error["message"] and error["type"]
    if code:
        assert error["code"] == code, error
    if status == 403:  # the same words whether or not the file exists
        assert error["message"] == "the video path is outside the folders this server may read"
    assert "dycoke-uploads-" not in error["message"]  # an upload's temporary path is never shown


def test_server_answers_after_bad_requests(
    client: OpenAI, model: str, server: ServerProcess, media: dict[str, Path]
) -> None:
    assert post(server, None, raw=b"{").status_code == 400
    assert post(server, _fill({"messages": [user("NOTES", "Q")], **OPTS}, media)).status_code == 400
    out = ask(client, model, media["clip"].as_uri(), QUESTIONS[2])
    assert out["choices"][0]["message"]["content"] == out["dycoke"]["answer"]
    health = server.health()
    assert health["status"] == "ok" and health["queue"] == 0


def test_api_key(server: ServerProcess, media: dict[str, Path], model: str) -> None:
    body = {"model": model, "messages": [user(media["clip"].as_uri(), "Q")], "max_tokens": 2, **OPTS}
    for key in (None, "wrong-key"):
        response = post(server, body, key=key)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.base}/v1/models", timeout=10).status_code == 401
    wrong = OpenAI(base_url=f"{server.base}/v1", api_key="wrong-key", timeout=30.0, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert httpx.get(f"{server.base}/health", timeout=10).status_code == 200  # health needs no key


def _data_url(data: bytes, subtype: str = "mp4") -> str:
    return f"data:video/{subtype};base64," + base64.b64encode(data).decode()


def test_upload_over_the_limit_is_413(server: ServerProcess, model: str) -> None:
    for size in (int(1.5 * 2**20), int(3.5 * 2**20)):  # caught after parsing, and while reading the body
        body = {"model": model, "messages": [user(_data_url(b"\0" * size), "Q")], **OPTS}
        response = post(server, body)
        assert response.status_code == 413, response.text
        error = response.json()["error"]
        assert error["code"] == "upload_too_large" and "--max-upload-mb" in error["message"]
    assert server.health()["status"] == "ok"


def test_data_url_upload(client: OpenAI, model: str, media: dict[str, Path]) -> None:
    url = _data_url(media["upload"].read_bytes())
    first = ask(client, model, url, QUESTIONS[0])
    again = ask(client, model, url, QUESTIONS[1])
    assert first["dycoke"]["video"]["path"].startswith("upload sha256:")
    assert first["dycoke"]["tokens"]["frames"] == 4
    assert first["dycoke"]["video_cache"] == "miss" and again["dycoke"]["video_cache"] == "hit"  # keyed by content
    same_file = ask(client, model, _data_url(media["upload"].read_bytes(), "x-matroska"), QUESTIONS[0])
    assert same_file["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]


def test_a_client_that_goes_away_is_cancelled(server: ServerProcess, model: str, media: dict[str, Path]) -> None:
    body = {
        "model": model,
        "messages": [user(media["clip"].as_uri(), QUESTIONS[3])],
        "max_tokens": 10000,  # a minute or more of generation, unless it stops
        "min_new_tokens": 10000,
        "stream": True,
        **OPTS,
    }
    before = server.health()["engine"]
    with httpx.stream(
        "POST", f"{server.base}/v1/chat/completions", json=body, headers=server.headers, timeout=60.0
    ) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        pieces = 0
        for line in lines:
            if line.startswith("data: ") and '"content"' in line:
                pieces += 1
            if pieces >= 3:
                break
    started = time.monotonic()
    health = server.health()
    while health["queue"] and time.monotonic() - started < 15:
        time.sleep(0.1)
        health = server.health()
    assert health["queue"] == 0, "the request still runs after its client left"
    assert health["engine"]["cancelled"] == before["cancelled"] + 1
    assert health["engine"]["stopped_batches"] == before["stopped_batches"] + 1  # stopped, not run to the end


def test_sigterm_exits_zero_while_a_request_runs(servers: dict[str, ServerProcess], media: dict[str, Path]) -> None:
    spare = servers["spare"]
    model = spare.health()["model"]
    body = {
        "model": model,
        "messages": [user(media["clip"].as_uri(), QUESTIONS[0])],
        "max_tokens": 3000,
        "min_new_tokens": 3000,
        "stream": True,
        **OPTS,
    }
    first_piece = threading.Event()
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            with httpx.stream("POST", f"{spare.base}/v1/chat/completions", json=body, timeout=30.0) as response:
                for line in response.iter_lines():
                    if '"content"' in line:
                        first_piece.set()
                    outcome["last"] = line
        except httpx.HTTPError as exc:  # the stream is cut when the server cancels it
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert first_piece.wait(30), spare.log_tail()
    started = time.monotonic()
    spare.signal()
    time.sleep(0.5)
    try:  # a new request during the grace period: refused (the listener is closed) or 503
        late = httpx.post(f"{spare.base}/v1/chat/completions", json=body, timeout=5)
        assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
    except httpx.TransportError:
        pass
    code = spare.proc.wait(timeout=12)
    elapsed = time.monotonic() - started
    assert code == 0, spare.log_tail()
    assert elapsed < 10, elapsed
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{spare.base}/health", timeout=2)
    thread.join(10)
    assert not thread.is_alive()


# -- units: the error mapping, the app with a fake model, the engine ------------------------------


def test_error_mapping() -> None:
    from dycoke.errors import ConfigError, ModelLoadError, OutOfMemoryError, VideoError
    from dycoke.server.protocol import ApiError, error_from_exception

    oom = error_from_exception(OutOfMemoryError("out of GPU memory in prefill with 32 frames"))
    assert oom.status == 503 and oom.code == "out_of_memory" and "32 frames" in oom.message
    assert oom.body()["error"]["type"] == "service_unavailable_error"
    assert error_from_exception(ConfigError("merge-ratio must be ...")).status == 400
    assert error_from_exception(VideoError("cannot read video x")).code == "invalid_video"
    assert error_from_exception(ModelLoadError("no template")).status == 400
    internal = error_from_exception(RuntimeError("device-side assert\nmore"))
    assert internal.status == 500 and internal.message.endswith("RuntimeError: device-side assert")
    original = ApiError(413, "too big", "upload_too_large")
    assert error_from_exception(original) is original


@pytest.fixture()
def fake_app(tmp_path: Path) -> Iterator[tuple[Any, FakeQA, Path]]:
    from fastapi.testclient import TestClient

    from dycoke.server import ServerSettings, build_engine, create_app

    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"fake video")
    settings = ServerSettings(model="fake-model", allowed_local_media_paths=(tmp_path,), warmup=False)
    qa = FakeQA()
    engine = build_engine(qa, settings)  # type: ignore[arg-type]
    with TestClient(create_app(engine, settings)) as test_client:
        yield test_client, qa, clip
    engine.media.close()


def test_out_of_memory_is_503_for_that_request_only(fake_app: tuple[Any, FakeQA, Path]) -> None:
    test_client, _, clip = fake_app
    body = {"messages": [user(clip.as_uri(), "raise:oom")]}
    response = test_client.post("/v1/chat/completions", json=body)
    assert response.status_code == 503 and response.json()["error"]["code"] == "out_of_memory"
    body = {"messages": [user(clip.as_uri(), "fine")]}
    response = test_client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == "answer: fine"
    assert response.json()["dycoke"]["video_cache"] == "miss"  # out of memory emptied the cache
    crash = test_client.post("/v1/chat/completions", json={"messages": [user(clip.as_uri(), "raise:other")]})
    assert crash.status_code == 500 and "RuntimeError: boom" in crash.json()["error"]["message"]
    assert test_client.post("/v1/chat/completions", json=body).status_code == 200


def test_fake_cached_answer_reports_no_preparation(fake_app: tuple[Any, FakeQA, Path]) -> None:
    test_client, qa, clip = fake_app
    reports = [
        test_client.post("/v1/chat/completions", json={"messages": [user(clip.as_uri(), q)]}).json()["dycoke"]
        for q in ("a", "b")
    ]
    assert [r["video_cache"] for r in reports] == ["miss", "hit"] and qa.prepared == 1
    assert reports[0]["timings_s"]["video_decode"] == 0.5
    assert reports[1]["timings_s"]["video_decode"] == 0 and reports[1]["timings_s"]["total"] == 2.0


def _engine_with_fake(tmp_path: Path, max_batch_size: int = 8, batch_wait_s: float = 0.02) -> tuple[Any, FakeQA, Any]:
    from dycoke.server.engine import Engine
    from dycoke.server.media import MediaStore, VideoSource

    qa = FakeQA()
    engine = Engine(
        qa,  # type: ignore[arg-type]
        MediaStore((tmp_path,), 2**20),
        cache_bytes=2**30,
        max_batch_size=max_batch_size,
        max_queue=64,
        batch_wait_s=batch_wait_s,
    )

    def source(name: str) -> VideoSource:
        return VideoSource(path=tmp_path / name, identity=("file", name, 1, 1), display=name)

    return engine, qa, source


def _question_on(source: Any, question: str, loop: asyncio.AbstractEventLoop) -> Any:
    """A non-streaming job asking ``question`` about ``source`` with the default options."""
    from dycoke.config import RunOptions
    from dycoke.server.engine import Job

    return Job(source=source, question=question, options=RunOptions(), stream=False, loop=loop)


async def _answered(job: Any) -> None:
    """Wait (10 s at most per event) until ``job`` is done."""
    from dycoke.server.engine import Done

    while not isinstance(await asyncio.wait_for(job.events.get(), 10), Done):
        pass


def test_engine_batches_same_video_and_options_and_drops_cancelled(tmp_path: Path) -> None:
    from dycoke.config import RunOptions, run_options
    from dycoke.server.engine import Done, Job, Text

    async def scenario() -> None:
        engine, qa, source = _engine_with_fake(tmp_path, max_batch_size=3)
        loop = asyncio.get_running_loop()
        qa.gate = threading.Event()
        other = run_options(RunOptions(), merge_ratio=0.5)

        def job(name: str, question: str, options: RunOptions | None = None, stream: bool = False) -> Job:
            return Job(
                source=source(name), question=question, options=options or RunOptions(), stream=stream, loop=loop
            )

        blocker = job("a.mp4", "first")
        engine.start()
        engine.submit(blocker)
        assert await asyncio.to_thread(qa.entered.wait, 5)  # the worker is inside the first batch
        jobs = [
            job("a.mp4", "q1", stream=True),
            job("b.mp4", "other video"),
            job("a.mp4", "q2"),
            job("a.mp4", "other options", other),
            job("a.mp4", "cancelled"),
            job("a.mp4", "q3"),
            job("a.mp4", "q4"),
        ]
        for j in jobs:
            engine.submit(j)
        engine.cancel(jobs[4])
        assert engine.queue_size() == 7  # 1 running + 6 waiting
        qa.gate.set()
        results = {}
        for j in [blocker, *jobs[:4], *jobs[5:]]:
            events = []
            while True:
                event = await asyncio.wait_for(j.events.get(), 5)
                events.append(event)
                if not isinstance(event, Text):
                    break
            assert isinstance(events[-1], Done)
            results[j.question] = (events[-1].report.answer, "".join(e.piece for e in events if isinstance(e, Text)))
        engine.close(2)
        assert qa.batches == [["first"], ["q1", "q2", "q3"], ["other video"], ["other options"], ["q4"]]
        assert results["q1"] == ("answer: q1", "answer: q1")  # streamed pieces add up to the answer, stripped
        assert results["q2"][1] == ""  # a non-streaming request gets no pieces
        assert jobs[4].events.empty() and engine.stats()["cancelled"] == 1

    asyncio.run(scenario())


def test_engine_stops_a_batch_whose_clients_all_left_and_isolates_a_failing_request(tmp_path: Path) -> None:
    from dycoke.config import RunOptions
    from dycoke.server.engine import Done, Failed, Job

    async def scenario() -> None:
        engine, qa, source = _engine_with_fake(tmp_path)
        loop = asyncio.get_running_loop()
        qa.gate = threading.Event()
        engine.start()
        running = [Job(source=source("a.mp4"), question=q, options=RunOptions(), stream=True, loop=loop) for q in "xy"]
        for j in running:
            engine.submit(j)
        assert await asyncio.to_thread(qa.entered.wait, 5)
        for j in running:
            engine.cancel(j)
        deadline = time.monotonic() + 5
        while engine.queue_size() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert qa.stopped_early and engine.queue_size() == 0

        qa.gate = None  # a batch with one bad request: the others are answered one by one
        qa.entered.clear()
        batch = [
            Job(source=source("c.mp4"), question=q, options=RunOptions(), stream=False, loop=loop)
            for q in ("ok", "raise:video", "fine")
        ]
        engine.stop_accepting()
        with pytest.raises(Exception, match="shutting down"):
            engine.submit(batch[0])
        engine._accepting = True
        for j in batch:
            engine.submit(j)
        events = [await asyncio.wait_for(j.events.get(), 5) for j in batch]
        assert isinstance(events[0], Done) and isinstance(events[2], Done)
        assert isinstance(events[1], Failed) and "bad video" in str(events[1].error)
        engine.close(2)

    asyncio.run(scenario())


def test_warm_up_answers_on_a_synthetic_clip(tiny_checkpoint: Path) -> None:
    from dycoke.config import RunOptions, VideoOptions
    from dycoke.pipeline import VideoQA
    from dycoke.server import warm_up
    from dycoke.server.app import WARM_UP_TOKENS

    qa = VideoQA.load(str(tiny_checkpoint), device="cpu")
    reports = []
    answer_many = qa.answer_many

    def recorded(*args: Any, **kwargs: Any) -> Any:
        reports.extend(answer_many(*args, **kwargs))
        return reports[-1:]

    qa.answer_many = recorded  # type: ignore[method-assign]
    warm_up(qa, RunOptions(video=VideoOptions(num_frames=4)))
    assert qa.load_s is None  # the load time went into the warm-up answer's report
    # as the engine answers, per method (the default, then full): a first question prefills the shared
    # prefix, the follow-up continues from it; every answer as long as the warm-up asks
    assert [r.method for r in reports] == ["dycoke", "dycoke", "full", "full"]
    assert all(r.timings_s.shared_prefix > 0 for r in reports[::2])
    assert all(r.timings_s.shared_prefix == 0 for r in reports[1::2])
    assert all(r.tokens.generated == WARM_UP_TOKENS for r in reports)


def test_prepared_cache_evicts_the_least_recently_used_beyond_its_budget() -> None:
    from dycoke.config import VideoOptions
    from dycoke.server.cache import PreparedCache

    class Sized:
        def __init__(self, size: int, vision: Any = None) -> None:
            self.size, self.vision = size, vision

        def nbytes(self) -> int:
            return self.size

    cache = PreparedCache(max_bytes=1000)
    four, five = VideoOptions(num_frames=4), VideoOptions(num_frames=5)
    a, b, c = Sized(400), Sized(400), Sized(400)
    cache.put(("a",), four, a)  # type: ignore[arg-type]
    cache.put(("b",), four, b)  # type: ignore[arg-type]
    assert cache.get(("a",), four, False) is a  # a is now the most recently used
    cache.put(("c",), four, c)  # type: ignore[arg-type]
    assert cache.get(("b",), four, False) is None and cache.get(("a",), four, False) is a
    assert cache.get(("a",), five, False) is None  # other frames, another entry
    assert cache.stats()["evictions"] == 1 and cache.nbytes == 800
    with_signals = Sized(100, vision=object())
    cache.put(("a",), four, with_signals)  # type: ignore[arg-type]
    assert cache.get(("a",), four, True) is with_signals and cache.get(("a",), four, False) is with_signals
    assert cache.get(("c",), four, True) is None  # PruMerge needs the signals: not this entry
    c.size = 2000  # the memoised prefix KV grew it past the budget
    cache.refresh(c)  # type: ignore[arg-type]
    assert cache.get(("c",), four, False) is None and len(cache) == 1
    nothing = PreparedCache(max_bytes=0)  # --cache-gb 0: keeps nothing between requests
    nothing.put(("a",), four, a)  # type: ignore[arg-type]
    assert nothing.get(("a",), four, False) is None and len(nothing) == 0


def test_settings_are_checked(tmp_path: Path) -> None:
    from dycoke.errors import ConfigError
    from dycoke.server import ServerSettings

    assert ServerSettings(allowed_local_media_paths=(tmp_path / ".",)).allowed_local_media_paths == (
        tmp_path.resolve(),
    )
    for kwargs, words in [
        ({"port": 0}, "port"),
        ({"port": 70000}, "port"),
        ({"allowed_local_media_paths": (tmp_path / "missing",)}, "does not exist"),
        ({"max_upload_mb": 0}, "max-upload-mb"),
        ({"cache_gb": -1}, "cache-gb"),
        ({"max_batch_size": 0}, "max-batch-size"),
        ({"api_key": " "}, "api-key"),
        ({"device": "tpu"}, "device"),
    ]:
        with pytest.raises(ConfigError, match=words):
            ServerSettings(**kwargs)  # type: ignore[arg-type]


def test_the_server_loads_with_the_weights_read_ahead(monkeypatch: pytest.MonkeyPatch, tiny_checkpoint: Path) -> None:
    """``dycoke serve`` starts the weight read (``dycoke.weights.prefetch_weights``) before the model code
    imports and hands it to the load, as a fresh ``ask`` does (on the CPU the read returns None)."""
    import socket

    from dycoke import pipeline, weights
    from dycoke.server import ServerSettings
    from dycoke.server.app import serve

    seen: dict[str, Any] = {}

    class Stop(Exception):
        pass

    def read_ahead(options: Any) -> str:
        seen["read"] = options
        return "the tensors being read"

    def load(cls: Any, model: Any, **kwargs: Any) -> None:
        seen["load"] = (model, kwargs)
        raise Stop

    monkeypatch.setattr(weights, "prefetch_weights", read_ahead)
    monkeypatch.setattr(pipeline.VideoQA, "load", classmethod(load))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(Stop):
        serve(ServerSettings(model=str(tiny_checkpoint), device="cpu", dtype="float32", port=port))
    options, kwargs = seen["load"]
    assert options is seen["read"] and kwargs == {"weights": "the tensors being read"}
    assert (options.model, options.device, options.dtype) == (str(tiny_checkpoint), "cpu", "float32")


def test_importing_the_server_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, dycoke.server; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_engine_waits_briefly_for_concurrent_clients_but_never_for_a_lone_one(tmp_path: Path) -> None:
    from dycoke.server.engine import Job

    async def scenario() -> None:
        engine, qa, source = _engine_with_fake(tmp_path, max_batch_size=4, batch_wait_s=2.0)
        loop = asyncio.get_running_loop()

        def job(question: str) -> Job:
            return _question_on(source("a.mp4"), question, loop)

        engine.start()
        lone = job("alone")
        t0 = time.monotonic()
        engine.submit(lone)
        await _answered(lone)
        assert time.monotonic() - t0 < 1.0  # nothing ran when it came: no waiting for company
        qa.gate = threading.Event()
        qa.entered.clear()
        blocker, first, second = job("first"), job("q1"), job("q2")
        engine.submit(blocker)
        assert await asyncio.to_thread(qa.entered.wait, 5)
        engine.submit(first)  # arrives while a batch runs: clients are asking concurrently
        qa.gate.set()
        await asyncio.sleep(0.3)  # the worker has formed [q1] and waits for company
        engine.submit(second)
        for j in (blocker, first, second):
            await _answered(j)
        engine.close(2)
        assert qa.batches == [["alone"], ["first"], ["q1", "q2"]]

    asyncio.run(scenario())


def test_engine_waits_for_as_many_clients_as_its_last_batch_answered(tmp_path: Path) -> None:
    """Clients answered together send their next questions a few ms apart, after the batch ended: the
    worker waits for that many (not for the whole wait, and not for a full batch)."""
    from dycoke.server.engine import Job

    async def scenario() -> None:
        engine, qa, source = _engine_with_fake(tmp_path, max_batch_size=4, batch_wait_s=3.0)
        loop = asyncio.get_running_loop()

        def job(question: str) -> Job:
            return _question_on(source("a.mp4"), question, loop)

        engine.start()
        qa.gate = threading.Event()
        blocker = job("first")
        engine.submit(blocker)
        assert await asyncio.to_thread(qa.entered.wait, 5)
        round_one = [job(f"a{i}") for i in range(4)]
        for j in round_one:  # arrive while a batch runs: a full batch forms at once
            engine.submit(j)
        qa.gate.set()
        for j in (blocker, *round_one):
            await _answered(j)
        t0 = time.monotonic()
        round_two = [job(f"b{i}") for i in range(4)]
        for j in round_two:  # the same four clients, after their answers, 50 ms apart
            engine.submit(j)
            await asyncio.sleep(0.05)
        for j in round_two:
            await _answered(j)
        assert time.monotonic() - t0 < 2.0  # formed as soon as the fourth came, not after the 3-s wait
        engine.close(2)
        assert qa.batches == [["first"], ["a0", "a1", "a2", "a3"], ["b0", "b1", "b2", "b3"]]

    asyncio.run(scenario())
