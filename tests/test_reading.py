"""``dycoke.reading.start_reading``: the video read beside the caller, on a thread or in a forked child."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from dycoke import reading
from dycoke.config import VideoOptions
from dycoke.errors import VideoError

ROOT = Path(__file__).resolve().parents[1]
CLIP = ROOT / "samples" / "bigbuckbunny.mp4"


@pytest.mark.skipif(sys.platform != "linux", reason="the child process is forked on Linux only")
def test_a_child_process_reads_the_same_frames_and_reports_the_same_errors(tmp_path: Path) -> None:
    # a fresh interpreter: pytest's own process may run threads, and then no child is forked
    script = textwrap.dedent(
        f"""
        import mmap, os, numpy as np
        from dycoke.config import VideoOptions
        from dycoke.errors import VideoError
        from dycoke.reading import decode_video, start_reading
        forks, fork = [], os.fork
        os.fork = lambda: forks.append(1) or fork()
        options = VideoOptions(num_frames=8)
        future = start_reading({str(CLIP)!r}, options, separate_process=True)
        got, expected = future.result(), decode_video({str(CLIP)!r}, options)
        assert len(forks) == 1, forks
        base = got.frames.frames
        while getattr(base, "base", None) is not None:
            base = base.base
        base = base.obj if isinstance(base, memoryview) else base
        assert isinstance(base, mmap.mmap), type(base)  # mapped from the child, not pickled back
        assert np.array_equal(got.frames.frames, expected.frames.frames)
        assert got.frames.indices == expected.frames.indices and got.path == expected.path
        try:
            start_reading({str(ROOT / "README.md")!r}, options, separate_process=True).result()
        except VideoError as exc:
            print("VideoError:", exc)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "VideoError: cannot read video" in done.stdout


def test_a_process_with_threads_reads_on_a_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_fork(*args: object, **kwargs: object) -> None:
        raise AssertionError("forked while another thread runs")

    monkeypatch.setattr("dycoke.frame_stream.FrameStream", no_fork)
    release = threading.Event()
    other = threading.Thread(target=release.wait)
    other.start()
    try:
        got = reading.start_reading(CLIP, VideoOptions(num_frames=4), separate_process=True).result()
    finally:
        release.set()
        other.join()
    assert got.frames.frames.shape[0] == 4 and got.frames.frames.shape[3] == 3
    with pytest.raises(VideoError, match="video not found"):
        reading.start_reading(ROOT / "missing.mp4", VideoOptions(num_frames=4)).result()
