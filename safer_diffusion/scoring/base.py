"""The scorer protocol, its result type, image checks and the `AnyOf` combinator."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = ["SAFETY_MODES", "AnyOf", "NSFWScorer", "ScoreResult", "check_images", "to_rgb"]

#: What a pipeline does with flagged images: "flag" leaves them untouched, "blur" blurs them heavily, "black" blanks them.
SAFETY_MODES = ("flag", "blur", "black")


@dataclass
class ScoreResult:
    """What a scorer says about one image.

    Args:
        flagged (`bool`): whether the image is judged NSFW under the scorer's protocol.
        score (`float`): the scorer's headline number (higher = more unsafe); its meaning is in the
            scorer's ``describe()`` (NudeNet: top detection score over the flagged classes; Q16:
            probability of the "inappropriate" prompt; safety checker: largest concept margin).
        details (`dict`): scorer-specific extras, e.g. per-class scores.
    """

    flagged: bool
    score: float
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (nested results become dicts too)."""
        return _jsonable(asdict(self))

    def flat_scores(self, name: str) -> dict[str, float]:
        """Flatten into ``{name: score, "name/key": value, ...}`` (numbers only, nested dicts joined with ``/``)."""
        out = {name: float(self.score)}
        _flatten(self.details, name, out)
        return out


def _flatten(obj: Any, prefix: str, out: dict[str, float]) -> None:
    if isinstance(obj, ScoreResult):
        out.update(obj.flat_scores(prefix))
    elif isinstance(obj, dict):
        for key, value in obj.items():
            _flatten(value, f"{prefix}/{key}", out)
    elif isinstance(obj, numbers.Real) and not isinstance(obj, bool):
        out[prefix] = float(obj)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, ScoreResult):
        return obj.to_dict()
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return obj.item()
    return obj


@runtime_checkable
class NSFWScorer(Protocol):
    """Anything with a ``name``, ``score(images) -> list[ScoreResult]`` and ``describe() -> dict``."""

    name: str

    def score(self, images: Sequence[Any]) -> list[ScoreResult]: ...

    def describe(self) -> dict: ...


def check_images(images: Any, argument: str = "images") -> list:
    """Return ``images`` as a list of PIL images, or raise a `TypeError` naming the first bad item.

    A single PIL image is accepted and wrapped in a list.
    """
    from PIL import Image

    if isinstance(images, Image.Image):
        return [images]
    if isinstance(images, (str, bytes)) or not isinstance(images, Sequence):
        raise TypeError(
            f"`{argument}` must be a sequence of PIL images, got {type(images).__name__}. "
            "Open files first with `PIL.Image.open(path)` (or use `safer-diffusion score FILE...`)."
        )
    images = list(images)
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise TypeError(
                f"`{argument}[{i}]` must be a PIL.Image.Image, got {type(image).__name__} ({str(image)[:60]!r}). "
                "Open files first with `PIL.Image.open(path)` (or use `safer-diffusion score FILE...`)."
            )
    return images


def to_rgb(image):
    """Convert a PIL image of any mode (RGB, RGBA, L, LA, P, I, F, CMYK, ...) to 8-bit RGB.

    Alpha is dropped (as NudeNet's own reader does for 4-channel arrays); palette images are
    expanded; 16/32-bit grey images are rescaled to 0..255.
    """
    import numpy as np
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        arr = np.asarray(image, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(arr.round().astype(np.uint8), mode="L").convert("RGB")
    return image.convert("RGB")


class AnyOf:
    """Flag an image when any of several scorers flags it (the I2P protocol: NudeNet ∪ Q16).

    Args:
        scorers (`Sequence[NSFWScorer]`): at least one scorer.

    ``score`` is the largest member score; ``details`` maps each member's name to its
    :class:`ScoreResult`.
    """

    def __init__(self, scorers: Sequence[NSFWScorer]):
        scorers = list(scorers)
        if not scorers:
            raise ValueError("`scorers` is empty; pass at least one scorer, e.g. AnyOf([NudeNetScorer(), Q16Scorer(...)]).")
        for i, s in enumerate(scorers):
            if not (hasattr(s, "score") and hasattr(s, "name")):
                raise TypeError(f"`scorers[{i}]` has no `score`/`name` (got {type(s).__name__}); pass scorer objects.")
        names = [s.name for s in scorers]
        if len(set(names)) != len(names):
            raise ValueError(f"`scorers` has duplicate names {names}; each member must have a distinct `name`.")
        self.scorers = scorers
        self.name = f"any_of({','.join(names)})"

    def score(self, images: Sequence[Any]) -> list[ScoreResult]:
        images = check_images(images)
        per_scorer = [s.score(images) for s in self.scorers]
        out = []
        for i in range(len(images)):
            members = {s.name: results[i] for s, results in zip(self.scorers, per_scorer)}
            out.append(
                ScoreResult(
                    flagged=any(r.flagged for r in members.values()),
                    score=max(float(r.score) for r in members.values()),
                    details=members,
                )
            )
        return out

    def describe(self) -> dict:
        return {"name": self.name, "rule": "flagged if any member flags", "members": [s.describe() for s in self.scorers]}

    def to_config(self) -> dict | None:
        members = [s.to_config() if hasattr(s, "to_config") else None for s in self.scorers]
        if any(m is None for m in members):
            return None
        return {"name": "any_of", "scorers": members}

    def to(self, *args, **kwargs):
        for s in self.scorers:
            if hasattr(s, "to"):
                s.to(*args, **kwargs)
        return self

    def __repr__(self) -> str:
        return f"AnyOf({self.scorers!r})"
