"""i2vd: an image-to-video hot-folder daemon (inbox image + sidecar YAML -> I2VGen-XL -> outbox)."""

from __future__ import annotations

__version__ = "0.1.0"
