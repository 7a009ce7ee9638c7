"""``python -m safer_diffusion.evaluate``: the NSFW generation-rate evaluation (see :mod:`safer_diffusion.evaluation.cli`)."""

from .evaluation.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
