"""A picture of what a method kept: the sampled frames with the dropped patches dimmed, and for
DyCoke a strip per decode step showing where the attention went and what layers >= L kept.

Token (frame, patch) maps back to pixels through the model's geometry: each frame is resized to
384x384 (aspect not kept) and cut into 27x27 patches of 14 px, which cover the first 378 px (the last
6 px of each side are never seen by SigLIP's patch embedding); the projected patches are pooled
bilinearly to a 14x14 grid. Pooled cell (r, c) therefore covers the fraction
[c/14, (c+1)/14) x 378/384 of the frame's width (and likewise rows and height), whatever the frame's
own size.

Nothing here runs unless a drawing is asked for (``--show-tokens``); the traces it draws are recorded
only then.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dycoke.errors import ConfigError
from dycoke.report import Trace

DIM = 0.25  # brightness left to a dropped patch
THUMB_WIDTH = 176
COLUMNS = 8
CELL = (12, 14)  # (width per decode step, height per frame) of the strips
LABEL = 30  # left column of the strips: frame numbers
MARGIN = 8
SEEN = 27 * 14 / 384  # share of each side that SigLIP's 14-px patches cover on the 384-px resize
TEXT = 14  # line height


def patch_box(patch: int, grid: int, height: int, width: int) -> tuple[int, int, int, int]:
    """Pixel box (x0, y0, x1, y1), end-exclusive, of pooled cell ``patch`` of a ``grid`` x ``grid`` layout
    on a frame of ``height`` x ``width`` (see the module docstring for the geometry)."""
    row, col = divmod(patch, grid)
    step_x, step_y = SEEN * width / grid, SEEN * height / grid
    return round(col * step_x), round(row * step_y), round((col + 1) * step_x), round((row + 1) * step_y)


def kept_masks(kept: list[tuple[int, int]], num_frames: int, grid: int) -> np.ndarray:
    """(F, grid, grid) bool: the patches of each frame that some kept token comes from."""
    masks = np.zeros((num_frames, grid, grid), dtype=bool)
    for frame, patch in kept:
        if patch >= 0:
            masks[frame, patch // grid, patch % grid] = True
    return masks


def dim_dropped(frame: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A copy of (H, W, 3) ``frame`` with the patches not in (grid, grid) ``mask`` darkened to ``DIM``, and
    the right and bottom margins that no patch covers darkened too (the model never sees them)."""
    out = frame.astype(np.float32)
    grid = mask.shape[0]
    height, width = frame.shape[:2]
    out[round(SEEN * height) :] *= DIM
    out[:, round(SEEN * width) :] *= DIM
    for patch in np.flatnonzero(~mask.reshape(-1)):
        x0, y0, x1, y1 = patch_box(int(patch), grid, height, width)
        out[y0:y1, x0:x1] *= DIM
    return out.round().astype(np.uint8)


def _frames_panel(trace: Trace, title: str) -> Any:
    from PIL import Image, ImageDraw

    frames = trace.frames
    f, height, width = frames.shape[:3]
    shown = trace.late_kept if trace.late_kept is not None else trace.kept
    masks = kept_masks(shown, f, trace.grid)
    counts = np.bincount([frame for frame, _ in trace.kept], minlength=f)
    thumb_h = max(1, round(THUMB_WIDTH * height / width))
    columns = min(COLUMNS, f)
    rows = -(-f // columns)
    panel = Image.new("RGB", (columns * (THUMB_WIDTH + MARGIN) + MARGIN, TEXT * 2 + rows * (thumb_h + TEXT + MARGIN)))
    draw = ImageDraw.Draw(panel)
    draw.text((MARGIN, 2), title, fill=(255, 255, 255))
    for i in range(f):
        dimmed = dim_dropped(frames[i], masks[i])
        thumb = Image.fromarray(dimmed).resize((THUMB_WIDTH, thumb_h), Image.Resampling.BILINEAR)
        x = MARGIN + (i % columns) * (THUMB_WIDTH + MARGIN)
        y = TEXT * 2 + (i // columns) * (thumb_h + TEXT + MARGIN)
        panel.paste(thumb, (x, y))
        label = f"frame {i}: {counts[i]} tokens"
        if trace.late_kept is not None:
            late = int(masks[i].sum())
            label = f"frame {i}: {late} of {counts[i]}"
        draw.text((x, y + thumb_h + 1), label, fill=(230, 230, 230))
    return panel


def _strip(values: np.ndarray, label: str, width: int) -> Any:
    """A heat map, frames as rows and decode steps as columns, values in [0, 1]."""
    from PIL import Image, ImageDraw

    frames, steps = values.shape
    cell_w, cell_h = CELL
    image = Image.new("RGB", (max(width, LABEL + MARGIN + steps * cell_w), 2 * TEXT + frames * cell_h + MARGIN))
    draw = ImageDraw.Draw(image)
    draw.text((MARGIN, 0), label, fill=(255, 255, 255))
    scaled = np.clip(values, 0.0, 1.0)
    for frame in range(frames):
        y = TEXT + frame * cell_h
        draw.text((MARGIN, y), f"f{frame}", fill=(200, 200, 200))
        for step in range(steps):
            v = float(scaled[frame, step])
            colour = (int(255 * v), int(180 * v), int(40 + 60 * v))
            x = LABEL + step * cell_w
            draw.rectangle((x, y, x + cell_w - 2, y + cell_h - 2), fill=colour)
    for step in range(0, steps, 10):
        draw.text((LABEL + step * cell_w, TEXT + frames * cell_h), f"{step + 1}", fill=(200, 200, 200))
    return image


def render(traces: list[Trace], titles: list[str] | None = None) -> Any:
    """One image: a panel per trace (frames grid, then DyCoke's decode strips), stacked."""
    from PIL import Image

    panels = []
    for index, trace in enumerate(traces):
        title = titles[index] if titles else trace.method
        panel = _frames_panel(trace, title)
        panels.append(panel)
        if trace.step_attention:
            attention = np.asarray(trace.step_attention).T  # (F, steps)
            peak = attention.max() if attention.size else 1.0
            panels.append(
                _strip(
                    attention / (peak or 1.0),
                    f"share of the visual attention at layer {(trace.late_layer or 1) - 1}, per frame (rows) "
                    "and decode step (columns); brightest = largest",
                    panel.width,
                )
            )
            kept = np.asarray(trace.step_kept, dtype=np.float32).T
            per_frame = np.bincount([f for f, _ in trace.kept], minlength=kept.shape[0]).reshape(-1, 1)
            panels.append(
                _strip(
                    kept / np.maximum(per_frame, 1),
                    f"share of each frame's tokens attended by layers >= {trace.late_layer} at each step",
                    panel.width,
                )
            )
    width = max(p.width for p in panels)
    image = Image.new("RGB", (width, sum(p.height for p in panels)))
    y = 0
    for p in panels:
        image.paste(p, (0, y))
        y += p.height
    return image


def save_png(traces: list[Trace], path: str | Path, titles: list[str] | None = None) -> Path:
    """Render ``traces`` and write them to a ``.png`` file."""
    out = Path(path)
    if out.suffix.lower() != ".png":
        raise ConfigError(f"the picture must be a .png file, got '{out.name}'")
    if not out.parent.is_dir():
        raise ConfigError(f"folder does not exist: {out.parent}")
    render(traces, titles).save(out, format="PNG")
    return out
