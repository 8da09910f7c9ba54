"""Where a request's video comes from: a ``file://`` URL under an allowed folder, or a ``data:`` upload.

A local path is resolved (symlinks, ``..``) before it is checked against the allowed folders, and a
path outside them is refused with the same message whether or not the file exists. An upload is
decoded to a temporary file named by the sha256 of its bytes; requests holding the same upload share
the file, which is deleted when the last of them is done.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import shutil
import tempfile
import threading
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from dycoke.server.protocol import ApiError, bad_request

_EXTENSIONS = {
    "mp4": ".mp4",
    "webm": ".webm",
    "x-matroska": ".mkv",
    "matroska": ".mkv",
    "quicktime": ".mov",
    "x-msvideo": ".avi",
    "avi": ".avi",
    "mpeg": ".mpg",
    "ogg": ".ogv",
    "3gpp": ".3gp",
    "mp2t": ".ts",
    "x-flv": ".flv",
}


@dataclass(frozen=True)
class VideoSource:
    """A readable video file for one request.

    ``identity`` names the content (resolved path, size and mtime of a local file; the sha256 of an
    upload): the prepared-video cache and request batching key on it. ``display`` is what reports and
    messages show instead of ``path`` (an upload's temporary file means nothing to the client).
    """

    path: Path
    identity: tuple[str | int, ...]
    display: str
    upload_name: str | None = None  # the temporary file of an upload (shared by requests with its bytes)


class MediaStore:
    """Resolves video URLs against the allowed folders and keeps uploaded videos on disk while in use."""

    def __init__(self, allowed: tuple[Path, ...], max_upload_bytes: int) -> None:
        self.allowed = tuple(Path(p).resolve() for p in allowed)
        self.max_upload_bytes = max_upload_bytes
        self.upload_dir = Path(tempfile.mkdtemp(prefix="dycoke-uploads-"))
        self._refs: dict[str, int] = {}
        self._lock = threading.Lock()

    def open(self, url: str) -> VideoSource:
        """The source a video URL names; ``ApiError`` (400/403/404/413) if it cannot be served. Uploads
        are decoded and written here: call from a worker thread, not the event loop. Every source
        returned must be handed to ``release`` once the request is done."""
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            return self._upload(url)
        if scheme == "file":
            return self._local(url)
        if scheme in ("http", "https"):
            raise bad_request(
                "remote video URLs are not fetched by this server: send a file:// URL under an allowed folder or "
                "the video itself as a data:video/...;base64 URL",
                "unsupported_url",
            )
        raise bad_request(
            "video_url must be a file:// URL (file:///absolute/path.mp4) or a data:video/<type>;base64 URL",
            "invalid_url",
        )

    def release(self, source: VideoSource) -> None:
        """The request holding ``source`` is done; an upload no request holds is deleted."""
        name = source.upload_name
        if name is None:
            return
        with self._lock:
            left = self._refs.get(name, 0) - 1
            if left > 0:
                self._refs[name] = left
                return
            self._refs.pop(name, None)
            (self.upload_dir / name).unlink(missing_ok=True)

    def close(self) -> None:
        shutil.rmtree(self.upload_dir, ignore_errors=True)

    # -- local files --------------------------------------------------------------------------------

    def _local(self, url: str) -> VideoSource:
        parts = urllib.parse.urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise bad_request("a file URL must name a local path: file:///absolute/path.mp4", "invalid_url")
        raw = urllib.parse.unquote(parts.path)
        if not raw.startswith("/") or "\x00" in raw:
            raise bad_request("a file URL must hold an absolute path: file:///absolute/path.mp4", "invalid_url")
        if not self.allowed:
            raise ApiError(
                403,
                "local video files are not served: start the server with --allowed-local-media-path DIR",
                "forbidden_path",
            )
        outside = ApiError(403, "the video path is outside the folders this server may read", "forbidden_path")
        try:
            resolved = Path(raw).resolve()
        except (OSError, RuntimeError):  # a symlink loop, an unreadable folder: nothing to say beyond "no"
            raise outside from None
        if not any(resolved.is_relative_to(folder) for folder in self.allowed):
            raise outside
        try:
            stat = resolved.stat()
        except FileNotFoundError:
            raise ApiError(404, f"video not found: {raw}", "video_not_found") from None
        except OSError as exc:
            raise ApiError(403, f"cannot read video {raw}: {exc.strerror or exc}", "forbidden_path") from None
        if resolved.is_dir():
            raise bad_request(f"video path is a folder, not a file: {raw}", "invalid_video")
        if not os.access(resolved, os.R_OK):
            raise ApiError(403, f"cannot read video {raw}: permission denied", "forbidden_path")
        return VideoSource(
            path=resolved,
            identity=("file", str(resolved), stat.st_size, stat.st_mtime_ns),
            display=str(resolved),
        )

    # -- uploads ------------------------------------------------------------------------------------

    def _upload(self, url: str) -> VideoSource:
        header, sep, payload = url[len("data:") :].partition(",")
        if not sep:
            raise bad_request("a data URL needs a comma before its payload: data:video/mp4;base64,...", "invalid_url")
        params = [p.strip().lower() for p in header.split(";")]
        media_type = params[0]
        if not media_type.startswith("video/"):
            raise bad_request(
                f"a data URL must carry a video (data:video/<type>;base64,...), got '{media_type or 'no type'}'",
                "invalid_url",
            )
        if "base64" not in params[1:]:
            raise bad_request("a video data URL must be base64-encoded: data:video/mp4;base64,...", "invalid_url")
        estimate = len(payload) * 3 // 4
        if estimate > self.max_upload_bytes + 3:
            raise self.too_large(estimate)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            try:  # line-wrapped base64: drop the whitespace and try again
                data = base64.b64decode("".join(payload.split()), validate=True)
            except (binascii.Error, ValueError):
                raise bad_request("the data URL's payload is not valid base64", "invalid_base64") from None
        if len(data) > self.max_upload_bytes:
            raise self.too_large(len(data))
        if not data:
            raise bad_request("the uploaded video is empty", "invalid_video")
        sha = hashlib.sha256(data).hexdigest()
        subtype = media_type.split("/", 1)[1]
        path = self.upload_dir / f"{sha}{_EXTENSIONS.get(subtype, '.bin')}"
        with self._lock:
            self._refs[path.name] = self._refs.get(path.name, 0) + 1
            present = path.exists()
        if not present:
            try:
                handle, temporary = tempfile.mkstemp(dir=self.upload_dir, prefix=".part-")
                with os.fdopen(handle, "wb") as out:
                    out.write(data)
                os.replace(temporary, path)
            except BaseException:
                self.release(VideoSource(path=path, identity=(), display="", upload_name=path.name))
                raise
        return VideoSource(
            path=path, identity=("upload", sha), display=f"upload sha256:{sha[:16]}", upload_name=path.name
        )

    def too_large(self, size: int) -> ApiError:
        limit = self.max_upload_bytes / 2**20
        return ApiError(
            413,
            f"the uploaded video is {size / 2**20:.1f} MB; this server takes at most {limit:g} MB (--max-upload-mb)",
            "upload_too_large",
        )
