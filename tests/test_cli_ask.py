"""`dycoke ask` end to end on the tiny checkpoint: streams, stdout/stderr split, --json, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.app import app
from tests.videos import textured_frames, write_video

runner = CliRunner()


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_video(tmp_path_factory.mktemp("cli") / "clip.mp4", textured_frames(20, 96, 128, seed=9), fps=10)


def ask(tiny: Path, video: Path | str, *extra: str) -> tuple[int, str, str]:
    args = ["ask", str(video), "What is in the video?", "--model", str(tiny), "--device", "cpu"]
    args += ["--frames", "8", "--max-new-tokens", "6", "--min-new-tokens", "6", "-L", "2", *extra]
    result = runner.invoke(app, args)
    return result.exit_code, result.stdout, result.stderr


def test_answer_on_stdout_summary_on_stderr(tiny_checkpoint: Path, clip: Path) -> None:
    code, out, err = ask(tiny_checkpoint, clip)
    assert code == 0, err
    assert out.strip() and "visual tokens" not in out
    assert "random weights" in err and "meaningless" in err
    assert "visual tokens to LLM" in err and "TTM: visual tokens" in err and "1569 -> 879" in err


def test_json_report(tiny_checkpoint: Path, clip: Path) -> None:
    code, out, err = ask(tiny_checkpoint, clip, "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["method"] == "dycoke"
    assert data["tokens"]["frames"] == 8
    assert data["tokens"]["visual"] == 879 and data["tokens"]["visual_uncompressed"] == 8 * 196 + 1
    assert data["tokens"]["generated"] == 6
    assert data["timings_s"]["total"] > 0 and "memory" in data and data["answer"] == data["answer"].strip()


def test_full_method_json(tiny_checkpoint: Path, clip: Path) -> None:
    code, out, _ = ask(tiny_checkpoint, clip, "--json", "--method", "full")
    assert code == 0
    data = json.loads(out)
    assert data["tokens"]["visual"] == data["tokens"]["visual_uncompressed"] == 1569


def test_quiet_prints_no_summary(tiny_checkpoint: Path, clip: Path) -> None:
    code, out, err = ask(tiny_checkpoint, clip, "--quiet")
    assert code == 0 and out.strip() and "visual tokens" not in err


def one_error_line(code: int, err: str, expected_code: int = 1) -> str:
    lines = err.strip().splitlines()
    assert code == expected_code and len(lines) == 1 and lines[0].startswith("Error: "), err
    return lines[0]


def test_non_video_file(tiny_checkpoint: Path, tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello, this is not a video\n" * 20)
    code, out, err = ask(tiny_checkpoint, text)
    assert out == ""
    assert "cannot read video" in one_error_line(code, err) or "no video stream" in err


def test_corrupt_video(tiny_checkpoint: Path, clip: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(clip.read_bytes()[: len(clip.read_bytes()) // 5])
    code, out, err = ask(tiny_checkpoint, broken)
    assert out == ""
    assert str(broken) in one_error_line(code, err)


def test_garbage_with_video_extension(tiny_checkpoint: Path, tmp_path: Path) -> None:
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(bytes(range(256)) * 64)
    code, _, err = ask(tiny_checkpoint, junk)
    assert str(junk) in one_error_line(code, err)


def test_not_a_checkpoint_directory(tmp_path: Path, clip: Path) -> None:
    code, _, err = ask(tmp_path, clip)
    assert "is not a LLaVA-OneVision checkpoint" in one_error_line(code, err)


def test_prune_layer_past_the_model(tiny_checkpoint: Path, clip: Path) -> None:
    code, _, err = ask(tiny_checkpoint, clip, "-L", "9")
    assert "prune-layer (L) must be below the model's 4 layers" in one_error_line(code, err, expected_code=2)


def test_bad_ratio_and_gate_mode(tiny_checkpoint: Path, clip: Path) -> None:
    code, _, err = ask(tiny_checkpoint, clip, "-K", "1.0")
    assert "merge-ratio (K) must be in [0.0, 1.0), got 1.0" in one_error_line(code, err, expected_code=2)
    code, _, err = ask(tiny_checkpoint, clip, "--gate-mode", "sometimes")
    assert "gate-mode must be 'official' or 'reuse'" in one_error_line(code, err, expected_code=2)


def test_make_tiny_model_refuses_a_full_directory(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    result = runner.invoke(app, ["make-tiny-model", str(tmp_path)])
    assert "is not empty" in one_error_line(result.exit_code, result.stderr, expected_code=2)
    assert (tmp_path / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("frames", [1, 3, 4])
def test_a_video_of_at_most_four_frames_is_kept_whole_with_one_warning(
    tiny_checkpoint: Path, clip: Path, frames: int
) -> None:
    code, out, err = ask(tiny_checkpoint, clip, "--json", "--frames", str(frames))
    assert code == 0, err
    tokens = json.loads(out)["tokens"]
    assert tokens["visual"] == frames * 196 + 1 == tokens["visual_uncompressed"]
    warnings = [line for line in err.splitlines() if "needs at least 5 frames" in line]
    assert len(warnings) == 1 and f"the video gives {frames}" in warnings[0] and "kept whole" in warnings[0]
    code, out, err = ask(tiny_checkpoint, clip, "--json", "--frames", "5")
    assert json.loads(out)["tokens"]["visual"] < 5 * 196 + 1 and "needs at least 5 frames" not in err


def test_the_report_shows_what_the_user_waited_for(tiny_checkpoint: Path, clip: Path) -> None:
    code, out, err = ask(tiny_checkpoint, clip, "--json")
    assert code == 0, err
    t = json.loads(out)["timings_s"]
    assert t["startup"] > 0 and t["load"] > 0 and t["wall"] > 0
    # the video is decoded while the model loads: the wall clock is less than the parts in a row
    assert t["wall"] >= t["startup"] + t["load"] and t["wall"] > t["total"]
    code, _, err = ask(tiny_checkpoint, clip)
    assert code == 0 and "wall clock" in err and "model load" in err and "start-up" in err


def test_in_process_calls_report_the_load_once_and_no_startup(tiny_checkpoint: Path, clip: Path) -> None:
    from dycoke import VideoQA

    qa = VideoQA.load(str(tiny_checkpoint), device="cpu")
    first = qa.ask(str(clip), "What?", num_frames=8, max_new_tokens=2)
    second = qa.ask(str(clip), "What?", num_frames=8, max_new_tokens=2)
    assert first.timings_s.load is not None and first.timings_s.load > 0 and second.timings_s.load is None
    assert first.timings_s.startup is None and first.timings_s.wall is None


def test_chat_in_process_keeps_the_conversation_and_its_commands(tiny_checkpoint: Path, clip: Path) -> None:
    args = ["chat", str(clip), "--model", str(tiny_checkpoint), "--device", "cpu", "--frames", "8", "-L", "2"]
    args += ["--max-new-tokens", "4"]
    typed = "What moves?\nAnd then?\n/method full\nWhy?\n/method nope\n/reset\nWho?\n/quit\nnot read\n"
    result = runner.invoke(app, args, input=typed)
    assert result.exit_code == 0, result.stderr
    done = [line for line in result.stderr.splitlines() if "visual tokens ·" in line]
    assert len(done) == 4  # four questions answered, the line after /quit never read
    assert done[0].startswith("you> dycoke") and done[2].startswith("you> full")
    assert "method must be one of" in result.stderr and "conversation reset" in result.stderr


def test_server_options_are_checked_before_any_request(tiny_checkpoint: Path, clip: Path) -> None:
    code, _, err = ask(tiny_checkpoint, clip, "--server", "http://127.0.0.1:9", "--compare", "full,dycoke")
    assert (
        code == 2
        and err.strip() == "Error: --compare and --show-tokens run in-process: drop --server (or DYCOKE_SERVER)"
    )
    code, _, err = ask(tiny_checkpoint, clip, "--server", "http://127.0.0.1:9")  # nothing listens on port 9
    assert code == 1 and err.strip().startswith("Error: cannot reach the dycoke server at http://127.0.0.1:9")


def test_the_process_clock_starts_when_the_process_does() -> None:
    """``startup`` and ``wall`` count from the process's start as the kernel recorded it (to its 10 ms
    tick), not from a boot time rounded to the second, which put it up to a second early."""
    import subprocess
    import sys
    import time

    for _ in range(3):
        before = time.time()
        done = subprocess.run(
            [sys.executable, "-c", "from cli.common import process_start; print(repr(process_start()))"],
            capture_output=True,
            text=True,
            check=True,
        )
        after = time.time()
        started = float(done.stdout)
        assert before - 0.02 <= started <= after, (before, started, after)
