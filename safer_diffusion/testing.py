"""Test helpers. Only ``tests/`` imports this module; product code (``--tiny``, benchmarks) uses
:mod:`safer_diffusion.tiny`, which owns the tiny models and the offline CLIP tokenizer."""

from __future__ import annotations

from .tiny import *  # noqa: F403 - the tests' one import point for the tiny factories
from .tiny import __all__  # noqa: F401
