"""Preprocessing and encoding a video's frames on the GPU while a forked child still decodes the rest.

``encode_while_reading`` takes the frames of a ``FrameStream`` group by group, as they land in the
memory both processes map, and runs the model's preprocessing and vision encoder on each group, so
that by the time the last frame is decoded most of the encoder's work is done. Every frame is encoded
alone by the encoder (SigLIP, the projector and the pooling see one frame at a time), so the tokens
are those of encoding all frames at once, up to the rounding of other batch sizes' kernels.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from dycoke.frame_stream import FrameStream
from dycoke.model import LoadedModel
from dycoke.preprocess import preprocess_frames
from dycoke.reading import DecodedVideo
from dycoke.transfer import synchronize, to_device
from dycoke.vision import encode_frames


@dataclass
class StreamedEncoding:
    """What ``encode_while_reading`` produced.

    ``pixels`` (F, 3, H, W) and ``features`` (F*T, D) on the model's device, ``newline`` (1, D).
    ``preprocess_s`` and ``encode_s`` are the time each took after the last frame was decoded (what
    they added to the wall clock; the rest ran beside the decode); ``encoded_while_reading`` counts the
    frames whose encoding started before the decode ended.
    """

    decoded: DecodedVideo
    pixels: torch.Tensor
    features: torch.Tensor
    newline: torch.Tensor
    preprocess_s: float
    encode_s: float
    encoded_while_reading: int

    @property
    def frame_features(self) -> torch.Tensor:
        """``features`` as (F, T, D)."""
        return self.features.view(self.pixels.shape[0], -1, self.features.shape[-1])


def group_size(num_frames: int) -> int:
    """Frames per encoder call while reading: an eighth of the video, between 8 and 16 frames (fewer
    frames per call launch the encoder's kernels more often; more leave a longer tail after the decode)."""
    return max(8, min(16, num_frames // 8))


def _runs(slots: list[int]) -> list[tuple[int, int]]:
    """Sorted slots -> [start, end) runs of consecutive slots."""
    runs: list[tuple[int, int]] = []
    for slot in slots:
        if runs and runs[-1][1] == slot:
            runs[-1] = (runs[-1][0], slot + 1)
        else:
            runs.append((slot, slot + 1))
    return runs


class _Encoder:
    """The destination tensors, filled group by group."""

    def __init__(self, loaded: LoadedModel, num_frames: int) -> None:
        self.loaded = loaded
        self.num_frames = num_frames
        self.pixels: torch.Tensor | None = None
        self.features: torch.Tensor | None = None  # (F, T, D)
        self.newline: torch.Tensor | None = None
        self.done: set[int] = set()

    def ready(self) -> int:
        """Leading frames encoded."""
        count = 0
        while count in self.done:
            count += 1
        return count

    def preprocess(self, frames: np.ndarray, slots: list[int]) -> list[tuple[tuple[int, int], torch.Tensor]]:
        """Resize and normalise the frames of ``slots`` on the device, one tensor per run of slots."""
        loaded = self.loaded
        out = []
        for start, end in _runs(slots):
            uploaded = to_device(torch.from_numpy(frames[start:end]), loaded.device)
            pixels = preprocess_frames(uploaded, loaded.preprocess, device=loaded.device, dtype=loaded.dtype)
            if self.pixels is None:
                self.pixels = pixels.new_empty((self.num_frames, *pixels.shape[1:]))
            self.pixels[start:end] = pixels
            out.append(((start, end), pixels))
        return out

    def encode(self, groups: list[tuple[tuple[int, int], torch.Tensor]]) -> None:
        loaded = self.loaded
        pixels = groups[0][1] if len(groups) == 1 else torch.cat([p for _, p in groups])
        with torch.inference_mode():
            tokens, newline, _ = encode_frames(loaded.model, pixels, loaded.tokens_per_frame)
        tokens = tokens.view(pixels.shape[0], loaded.tokens_per_frame, -1)
        if self.features is None:
            self.features = tokens.new_zeros((self.num_frames, *tokens.shape[1:]))
        offset = 0
        for (start, end), _ in groups:
            self.features[start:end] = tokens[offset : offset + end - start]
            offset += end - start
        self.newline = newline


def encode_while_reading(
    stream: FrameStream, loaded: LoadedModel, after_group: Callable[[torch.Tensor, int], None] | None = None
) -> StreamedEncoding:
    """Encode the stream's frames as they land (see the module docstring); waits for the read's end
    and raises its error. ``after_group(features, ready)`` runs after each group encoded while reading,
    with the (F, T, D) features (zeros where not encoded yet) and the count of leading frames encoded.
    Out-of-memory errors are the caller's to word."""
    encoder: _Encoder | None = None
    pending: set[int] = set()
    with torch.inference_mode():
        while (landed := stream.landed()) is not None:
            frames = stream.frames
            if frames is None:
                continue
            encoder = encoder or _Encoder(loaded, frames.shape[0])  # a restarted read has the same frames
            pending.update(s for s in landed if s not in encoder.done)
            if len(pending) >= group_size(encoder.num_frames):
                slots = sorted(pending)
                pending.clear()
                encoder.encode(encoder.preprocess(frames, slots))
                encoder.done.update(slots)
                if after_group is not None and encoder.features is not None:
                    after_group(encoder.features, encoder.ready())
        decoded = stream.result()
        frames = decoded.frames.frames
        encoder = encoder or _Encoder(loaded, frames.shape[0])
        early = len(encoder.done)
        rest = [s for s in range(encoder.num_frames) if s not in encoder.done]
        decode_end = stream.started + decoded.decode_s
        groups = encoder.preprocess(frames, rest) if rest else []
        synchronize(loaded.device)
        preprocessed = time.perf_counter()
        if groups:
            encoder.encode(groups)
        synchronize(loaded.device)
        encoded = time.perf_counter()
    assert encoder.pixels is not None and encoder.features is not None and encoder.newline is not None
    return StreamedEncoding(
        decoded=decoded,
        pixels=encoder.pixels,
        features=encoder.features.reshape(-1, encoder.features.shape[-1]),
        newline=encoder.newline,
        preprocess_s=max(0.0, preprocessed - decode_end),
        encode_s=encoded - max(preprocessed, decode_end),
        encoded_while_reading=early,
    )
