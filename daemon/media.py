"""What a produced file holds, read back with ffmpeg itself (the bundled build has no ffprobe).

`parse_probe_report` turns the report of `ffmpeg -i FILE -f null -progress pipe:1 -` into `MediaInfo`: codec,
size, pixel format and rate from the input header, the frame count from the last `frame=` progress line (the
decoder's count, not the container's claim, so a truncated file shows up).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_DURATION = re.compile(r"Duration: (\d+):(\d\d):(\d\d(?:\.\d+)?)")
_VIDEO_STREAM = re.compile(r"Stream #\d+:\d+\S*: Video: (.*)")
_SIZE = re.compile(r"^(\d+)x(\d+)")
_RATE = re.compile(r"^([\d.]+)(k?) (fps|tbr)$")


@dataclass(frozen=True)
class MediaInfo:
    """What was read back from a produced file (for an image: one frame, fps and duration 0)."""

    codec: str
    width: int
    height: int
    frames: int
    fps: float
    duration_seconds: float
    pix_fmt: str


def _split_top_level(text: str) -> list[str]:
    """Split ffmpeg's stream description on commas outside parentheses: `yuv420p(tv, bt709)` stays whole."""
    parts: list[str] = []
    depth, start = 0, 0
    for index, char in enumerate(text):
        if char in "([":
            depth += 1
        elif char in ")]":
            depth = max(0, depth - 1)
        elif char == "," and depth == 0:
            parts.append(text[start:index].strip())
            start = index + 1
    parts.append(text[start:].strip())
    return parts


def _parse_rate(fields: list[str]) -> float:
    """The stream's `N fps` (average rate), else `N tbr`; 0.0 when neither is given."""
    rates: dict[str, float] = {}
    for field in fields:
        match = _RATE.match(field)
        if match:
            rates[match.group(3)] = float(match.group(1)) * (1000.0 if match.group(2) else 1.0)
    return rates.get("fps", rates.get("tbr", 0.0))


def parse_probe_report(stderr: str, progress: str) -> MediaInfo:
    """Build `MediaInfo` from `ffmpeg -i FILE ... -progress pipe:1` output (the input header and the last
    `frame=` line of the progress report). Raises `ValueError` when no video stream is described."""
    header = stderr.split("Stream mapping:", 1)[0]
    stream = _VIDEO_STREAM.search(header)
    if stream is None:
        raise ValueError("no video stream in ffmpeg's report")
    fields = _split_top_level(stream.group(1))
    codec = fields[0].split(" ", 1)[0]
    pix_fmt = fields[1].split("(", 1)[0] if len(fields) > 1 else ""
    size = next((m for m in (_SIZE.match(field) for field in fields) if m), None)
    if size is None:
        raise ValueError("no frame size in ffmpeg's report")
    counts = re.findall(r"^frame=\s*(\d+)", progress, flags=re.MULTILINE)
    frames = int(counts[-1]) if counts else 0
    fps = _parse_rate(fields)
    duration = _DURATION.search(header)
    if duration is not None:
        hours, minutes, seconds = duration.groups()
        duration_seconds = int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    else:
        duration_seconds = frames / fps if fps > 0 else 0.0
    return MediaInfo(codec, int(size.group(1)), int(size.group(2)), frames, fps, duration_seconds, pix_fmt)
