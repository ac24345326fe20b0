"""Text-based recommender ranking engine (runtime library; never imports torch)."""

from __future__ import annotations

__version__ = "0.1.0"
