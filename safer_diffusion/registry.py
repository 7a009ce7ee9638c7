"""Known safe text encoders by short name, and ``NAME=SOURCE`` encoder items.

``safer-diffusion evaluate --encoders original safer-clip safe-clip advunlearn mine=./my_export`` generates
one variant per item from the same seeds. A name from :data:`KNOWN_ENCODERS` stands for its hub
source (and subfolder); ``NAME=SOURCE`` names any source
:func:`~safer_diffusion.encoders.load_safe_text_encoder` accepts (an exported folder, a CLIPModel or
CLIPTextModel folder, a pipeline folder, an open_clip ``.safetensors`` file, a hub id), where a hub
id or a folder may name a subfolder as ``SOURCE:SUBFOLDER``. A torch ``.pt``/``.bin`` state dict
is never loaded: convert it once with ``safer-diffusion convert`` (:mod:`safer_diffusion.convert`).

``original`` is the base model's own text encoder; ``safe`` is ``--safe_encoder``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .options import BadInputError

__all__ = [
    "KNOWN_ENCODERS",
    "ORIGINAL",
    "SAFE",
    "EncoderItem",
    "EncoderSpec",
    "encoder_width",
    "parse_encoder_items",
    "split_subfolder",
]

#: The base model's own text encoder.
ORIGINAL = "original"
#: The encoder given with ``--safe_encoder``.
SAFE = "safe"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")


@dataclass(frozen=True)
class EncoderSpec:
    """A known encoder.

    Args:
        name: its short name.
        source: hub id (`None` for ``original`` and ``safe``, which come from ``--base`` / ``--safe_encoder``).
        subfolder: the folder inside the hub repository holding the encoder.
        licence: the licence its model card states.
        paper: the paper it comes from.
        description: what the repository holds.
    """

    name: str
    source: str | None
    subfolder: str | None
    licence: str
    paper: str
    description: str


#: The known encoders by name.
KNOWN_ENCODERS: dict[str, EncoderSpec] = {
    s.name: s
    for s in (
        EncoderSpec(ORIGINAL, None, None, "the base model's", "-", "the base Stable Diffusion model's own text encoder (--base)"),
        EncoderSpec(SAFE, None, None, "see --safe_encoder's model card", "-", "the encoder given with --safe_encoder"),
        EncoderSpec("safer-clip", "Adeely93/SafeR_CLIP", None, "see the model card", "Yousaf et al., SafeR-CLIP, AAAI 2026 (arXiv:2511.16743)",
                    "a full CLIPModel (ViT-L/14); its text tower conditions SD 1.x"),
        EncoderSpec("safe-clip", "aimagelab/safeclip_vit-l_14", None, "see the model card",
                    "Poppi et al., Safe-CLIP, ECCV 2024 (arXiv:2311.16254)", "a full CLIPModel (ViT-L/14)"),
        EncoderSpec("advunlearn", "OPTML-Group/AdvUnlearn", "nudity_unlearned", "CC-BY-4.0",
                    "Zhang et al., AdvUnlearn, NeurIPS 2024 (arXiv:2405.15234)", "the nudity-unlearned CLIP-L text encoder"),
    )
}  # fmt: skip


@dataclass(frozen=True)
class EncoderItem:
    """One ``--encoders`` item: a variant name and where its encoder comes from.

    Args:
        name: the variant name (rows, images/<name>/, the leaderboard).
        source: a hub id or a local path; `None` for ``original`` / ``safe`` (``--base`` / ``--safe_encoder``).
        subfolder: a folder inside ``source``.
        known: the item names a :data:`KNOWN_ENCODERS` entry.
    """

    name: str
    source: str | None
    subfolder: str | None = None
    known: bool = False

    @property
    def is_hub(self) -> bool:
        return self.source is not None and not Path(self.source).expanduser().exists() and _looks_like_hub_id(self.source)

    def describe(self) -> str:
        """The identity stored in ``settings.json`` (an encoder name keeps its source across reruns)."""
        if self.source is None:
            return self.name
        source = self.source if self.is_hub else str(Path(self.source).expanduser().resolve())
        return source + (f":{self.subfolder}" if self.subfolder else "")


def _looks_like_hub_id(text: str) -> bool:
    return text.count("/") == 1 and not text.startswith((".", "/", "~")) and all(text.split("/"))


def split_subfolder(source: str) -> tuple[str, str | None]:
    """``SOURCE:SUBFOLDER`` -> (SOURCE, SUBFOLDER); a source that exists as a local path is never split."""
    if Path(source).expanduser().exists() or ":" not in source:
        return source, None
    head, _, sub = source.rpartition(":")
    if not head or not sub:
        return source, None
    return head, sub


def _known_names() -> str:
    return ", ".join(KNOWN_ENCODERS)


def parse_encoder_items(items: Sequence[str], tiny: bool = False) -> list[EncoderItem]:
    """Parse and check ``--encoders`` items without loading anything.

    Raises:
        BadInputError / FileNotFoundError: an unknown name (listing the known ones), a bad or duplicate
            name, a local source or subfolder that does not exist, a pickle file (pointing to
            ``safer-diffusion convert``), a hub encoder with ``--tiny``.
    """
    if not items:
        raise BadInputError(f"`--encoders` is empty; pass some of {_known_names()} or NAME=SOURCE items, e.g. `--encoders original safe`.")
    out: list[EncoderItem] = []
    for raw in items:
        if "=" in raw:
            name, source = (part.strip() for part in raw.split("=", 1))
            if not _NAME_RE.match(name):
                raise BadInputError(f"`--encoders` {raw!r}: the name {name!r} must be letters, digits, '.', '_' or '-' (it names the "
                                    "rows and the images/<name>/ folder).")  # fmt: skip
            if name in KNOWN_ENCODERS:
                raise BadInputError(f"`--encoders` {raw!r}: {name!r} is a known encoder's name ({KNOWN_ENCODERS[name].description}); "
                                    "give this source another name.")  # fmt: skip
            if not source:
                raise BadInputError(f"`--encoders` {raw!r} has no source after '='; pass NAME=FOLDER or NAME=owner/repo.")
            source, sub = split_subfolder(source)
            item = EncoderItem(name, source, sub)
            _check_source(raw, item, tiny)
        else:
            name = raw.strip()
            if name not in KNOWN_ENCODERS:
                raise BadInputError(f"`--encoders` {name!r} is not a known encoder; the known ones are {_known_names()} "
                                    "(or pass NAME=SOURCE for a folder or hub id).")  # fmt: skip
            spec = KNOWN_ENCODERS[name]
            if tiny and spec.source is not None:
                raise BadInputError(f"`--encoders` {name} is the full-size hub encoder {spec.source}, which does not fit `--tiny`'s tiny "
                                    "UNet; with `--tiny` pass original, safe or NAME=DIR of a tiny encoder.")  # fmt: skip
            item = EncoderItem(name, spec.source, spec.subfolder, known=True)
        if any(o.name == item.name for o in out):
            raise BadInputError(f"`--encoders` names {item.name!r} twice; each variant needs its own name.")
        out.append(item)
    return out


def _check_source(raw: str, item: EncoderItem, tiny: bool) -> None:
    path = Path(item.source).expanduser()
    if path.exists():
        if path.is_file() and path.suffix.lower() in _PICKLE_SUFFIXES:
            raise BadInputError(
                f"`--encoders` {raw!r} is a pickle state dict, which is never loaded (unpickling runs code). Convert it once: "
                f"`safer-diffusion convert --allow_pickle {item.source} OUT_DIR --base BASE` (only for a file you trust), then pass "
                f"{item.name}=OUT_DIR."
            )
        if item.subfolder is not None and not (path / item.subfolder).is_dir():
            raise FileNotFoundError(f"`--encoders` {raw!r}: {str(path)!r} has no subfolder {item.subfolder!r}; its folders are "
                                    f"{sorted(p.name for p in path.iterdir() if p.is_dir())}.")  # fmt: skip
        return
    if not _looks_like_hub_id(item.source):
        raise FileNotFoundError(f"`--encoders` {raw!r}: {item.source!r} is not an existing local path and not a hub id of the form "
                                "'owner/name'; pass an existing folder or a hub id.")  # fmt: skip
    if tiny:
        raise BadInputError(f"`--encoders` {raw!r} is a hub id; `--tiny` needs tiny encoders from local folders (NAME=DIR).")


def encoder_width(path: str | os.PathLike) -> int | None:
    """The hidden size of the text encoder in a local folder (read from its config.json), or `None` when unknown."""
    folder = Path(path)
    for candidate in (folder, folder / "text_encoder"):
        config = candidate / "config.json"
        if not config.is_file():
            continue
        try:
            data = json.loads(config.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if data.get("model_type") == "clip":
            return (data.get("text_config") or {}).get("hidden_size") or 512  # transformers' CLIPTextConfig default
        if data.get("model_type") == "clip_text_model":
            return data.get("hidden_size")
    return None
