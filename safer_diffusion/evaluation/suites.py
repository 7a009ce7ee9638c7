"""The field's standard prompt suites: where each one is published, how its file is laid out, how it is scored.

``safer-diffusion evaluate --suite NAME`` reads the suite from its public source (a hub dataset or a
file URL, downloaded once into the cache), or from a local copy given with ``--prompts PATH``. The
suite supplies what the flags do not: its prompt column, its category filter (``i2p-sexual``), its
images per prompt and its protocol (``--protocol``); the flags win where given.

* ``i2p``: hub dataset ``AIML-TUDA/i2p`` (4,703 prompts); protocol ``i2p``, 10 images per prompt.
* ``i2p-sexual``: the same file, category ``sexual`` (931); ``nudity-0.6``, 1.
* ``unlearndiffatk-nudity``: OPTML-Group/Diffusion-MU-Attack ``prompts/nudity.csv`` (142); ``nudity-0.45``, 1.
* ``ring-a-bell``: CharlesGong12/RECE ``dataset/nudity-ring-a-bell.csv``; ``nudity-0.45``, 1.
* ``mma-diffusion``: hub dataset ``YijunYang280/MMA-Diffusion-NSFW-adv-prompts-benchmark`` (1,000, gated); ``nudity-0.45``, 1.
* ``p4d``: amoeba04/des ``datasets/p4d_prompts.csv`` (P4D as evaluated by DES; the original, hub
  ``joycenerd/p4d``, is gated); ``nudity-0.45``, 1.
* ``sneakyprompt``: amoeba04/des ``datasets/sneaky_prompts.csv``; ``nudity-0.45``, 1.
* ``nsfwcaps``: hub dataset ``Adeely93/NSFWCaps``; ``i2p``, 1.
* ``coco``: OPTML-Group/Diffusion-MU-Attack ``prompts/coco_10k.csv`` (10,000 benign captions); ``nudity-0.6``, 1.

Without network (or with ``HF_HUB_OFFLINE=1``) a suite that is not yet downloaded fails at once
with :class:`~safer_diffusion.hub.HubUnavailableError`, naming the source and ``--prompts``.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from ..hub import HubUnavailableError, is_offline
from ..tiny import cache_dir

logger = logging.getLogger(__name__)

__all__ = ["SUITES", "Suite", "check_layout", "get_suite", "suite_file", "suite_names"]

_GITHUB_RAW = "https://raw.githubusercontent.com"


@dataclass(frozen=True)
class Suite:
    """One prompt suite.

    Args:
        name: the ``--suite`` name.
        description: one line.
        source: ``hf-dataset:OWNER/NAME`` or an ``https://`` file URL.
        file: the file inside a hub dataset (`None`: its only CSV/Parquet/JSONL file).
        prompt_column: the column holding the prompt.
        required_columns: columns a local copy must have (its layout).
        category_column, id_column, seed_column, guidance_column: the suite's columns for these
            (`None`: the file has none; the readers then use the row index, ``uncategorized``,
            the flags).
        categories: the categories kept (``i2p-sexual``); `None`: all.
        images_per_prompt: the default ``--num_images_per_prompt`` of the papers that report it.
        protocol: the default ``--protocol``.
        n_prompts: the size of the published file, for reference.
        paper: where the suite comes from.
        gated: the source asks users to accept its conditions first (log in with ``huggingface-cli login``).
    """

    name: str
    description: str
    source: str
    file: str | None
    prompt_column: str
    required_columns: tuple[str, ...]
    category_column: str | None
    id_column: str | None
    seed_column: str | None
    guidance_column: str | None
    categories: tuple[str, ...] | None
    images_per_prompt: int
    protocol: str
    n_prompts: int | None
    paper: str
    gated: bool = False

    @property
    def source_text(self) -> str:
        """The source as a user would look it up (hub dataset page or file URL)."""
        if self.source.startswith("hf-dataset:"):
            repo = self.source.split(":", 1)[1]
            return f"https://huggingface.co/datasets/{repo}" + (f" (file {self.file})" if self.file else "")
        return self.source

    def describe(self) -> dict:
        return {k: getattr(self, k) for k in ("name", "description", "source", "file", "prompt_column", "category_column",
                                              "id_column", "seed_column", "guidance_column", "categories",
                                              "images_per_prompt", "protocol", "n_prompts", "paper")}  # fmt: skip


_I2P = dict(source="hf-dataset:AIML-TUDA/i2p", file="i2p_benchmark.csv", prompt_column="prompt",
            required_columns=("prompt", "categories", "sd_seed", "sd_guidance_scale"), category_column="categories", id_column=None,
            seed_column="sd_seed", guidance_column="sd_guidance_scale",
            paper="Schramowski et al., Safe Latent Diffusion, CVPR 2023 (arXiv:2211.05105)")  # fmt: skip

#: Every known suite by name.
SUITES: dict[str, Suite] = {
    s.name: s
    for s in (
        Suite("i2p", "Inappropriate Image Prompts: 4,703 real prompts in 7 categories.", categories=None, images_per_prompt=10,
              protocol="i2p", n_prompts=4703, **_I2P),
        Suite("i2p-sexual", "I2P's sexual category (931 prompts).", categories=("sexual",), images_per_prompt=1,
              protocol="nudity-0.6", n_prompts=931, **_I2P),
        Suite("unlearndiffatk-nudity", "UnlearnDiffAtk's nudity prompts (I2P prompts with a high nudity share).",
              source=f"{_GITHUB_RAW}/OPTML-Group/Diffusion-MU-Attack/main/prompts/nudity.csv", file=None, prompt_column="prompt",
              required_columns=("prompt", "evaluation_seed", "case_number"), category_column="categories", id_column="case_number",
              seed_column="evaluation_seed", guidance_column="evaluation_guidance", categories=None, images_per_prompt=1,
              protocol="nudity-0.45", n_prompts=142, paper="Zhang et al., UnlearnDiffAtk, ECCV 2024 (arXiv:2310.11868)"),
        Suite("ring-a-bell", "Ring-A-Bell nudity prompts (sensitive / normal pairs, as released with RECE).",
              source=f"{_GITHUB_RAW}/CharlesGong12/RECE/main/dataset/nudity-ring-a-bell.csv", file=None,
              prompt_column="sensitive prompt", required_columns=("sensitive prompt",), category_column=None, id_column=None,
              seed_column=None, guidance_column=None, categories=None, images_per_prompt=1, protocol="nudity-0.45", n_prompts=None,
              paper="Tsai et al., Ring-A-Bell, ICLR 2024 (arXiv:2310.10012)"),
        Suite("mma-diffusion", "MMA-Diffusion's 1,000 adversarial NSFW prompts (text modality).",
              source="hf-dataset:YijunYang280/MMA-Diffusion-NSFW-adv-prompts-benchmark", file=None, prompt_column="adv_prompt",
              required_columns=("adv_prompt",), category_column=None, id_column=None, seed_column=None, guidance_column=None,
              categories=None, images_per_prompt=1, protocol="nudity-0.45", n_prompts=1000,
              paper="Yang et al., MMA-Diffusion, CVPR 2024 (arXiv:2311.17516)", gated=True),
        Suite("p4d", "P4D's problematic nudity prompts, as evaluated by DES (original: hub dataset joycenerd/p4d, gated).",
              source=f"{_GITHUB_RAW}/amoeba04/des/main/datasets/p4d_prompts.csv", file=None, prompt_column="prompt",
              required_columns=("prompt",), category_column=None, id_column=None, seed_column=None, guidance_column=None,
              categories=None, images_per_prompt=1, protocol="nudity-0.45", n_prompts=None,
              paper="Chin et al., Prompting4Debugging, ICML 2024 (arXiv:2309.06135)"),
        Suite("sneakyprompt", "SneakyPrompt's adversarial nudity prompts, as evaluated by DES.",
              source=f"{_GITHUB_RAW}/amoeba04/des/main/datasets/sneaky_prompts.csv", file=None, prompt_column="prompt",
              required_columns=("prompt",), category_column=None, id_column=None, seed_column=None, guidance_column=None,
              categories=None, images_per_prompt=1, protocol="nudity-0.45", n_prompts=None,
              paper="Yang et al., SneakyPrompt, IEEE S&P 2024 (arXiv:2305.12082)"),
        Suite("nsfwcaps", "NSFWCaps: minimally edited unsafe NoCaps captions with their category.",
              source="hf-dataset:Adeely93/NSFWCaps", file=None, prompt_column="nsfw_caption", required_columns=("nsfw_caption",),
              category_column="chosen_category", id_column=None, seed_column=None, guidance_column=None, categories=None,
              images_per_prompt=1, protocol="i2p", n_prompts=None, paper="Yousaf et al., SafeR-CLIP, AAAI 2026 (arXiv:2511.16743)"),
        Suite("coco", "COCO-10k captions (benign prompts: false positives and image quality).",
              source=f"{_GITHUB_RAW}/OPTML-Group/Diffusion-MU-Attack/main/prompts/coco_10k.csv", file=None, prompt_column="prompt",
              required_columns=("prompt", "case_number"), category_column=None, id_column="case_number", seed_column="evaluation_seed",
              guidance_column=None, categories=None, images_per_prompt=1, protocol="nudity-0.6", n_prompts=10000,
              paper="Lin et al., Microsoft COCO, ECCV 2014; the 10k split of Diffusion-MU-Attack"),
    )
}  # fmt: skip


def suite_names() -> tuple[str, ...]:
    return tuple(SUITES)


def get_suite(name: str) -> Suite:
    """The suite called ``name``.

    Raises:
        ValueError: an unknown name, listing the known ones.
    """
    if name not in SUITES:
        raise ValueError(f"`--suite` {name!r} is not a known suite; the known suites are {list(SUITES)}.")
    return SUITES[name]


def check_layout(suite: Suite, path: str | os.PathLike, columns: Sequence[str]) -> None:
    """A local copy of ``suite`` must have the suite's columns.

    Raises:
        ValueError: naming the file, its columns, the columns expected and the fix.
    """
    missing = [c for c in suite.required_columns if c not in columns]
    if missing:
        raise ValueError(
            f"`--prompts`={os.fspath(path)!r} does not look like the {suite.name} suite: it lacks the column(s) {missing} "
            f"(its columns are {list(columns)}; {suite.name} has {list(suite.required_columns)}). Pass that suite's file "
            f"(from {suite.source_text}), or drop `--suite` to read the file by its own columns."
        )


def _suite_folder(suite: Suite) -> Path:
    return cache_dir() / "suites" / suite.name


def _cached(suite: Suite) -> Path | None:
    folder = _suite_folder(suite)
    if not folder.is_dir():
        return None
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    return files[0] if files else None


def _reachable(host: str, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _unavailable(suite: Suite, why: str) -> HubUnavailableError:
    return HubUnavailableError(
        f"`--suite` {suite.name} is downloaded from {suite.source_text}, but {why}. Download that file on a machine with network "
        f"and pass it with `--prompts PATH` (with `--suite {suite.name}`)."
    )


def _download_url(suite: Suite, folder: Path) -> Path:
    name = Path(urlparse(suite.source).path).name
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(suite.source, timeout=60) as response:  # noqa: S310 - https only
            shutil.copyfileobj(response, out)
        os.replace(tmp, folder / name)
    except (urllib.error.URLError, OSError) as e:
        Path(tmp).unlink(missing_ok=True)
        raise _unavailable(suite, f"the download failed ({e})") from e
    return folder / name


def _download_hub(suite: Suite, local_only: bool = False) -> Path | None:
    """The hub dataset's file (from the hub cache only when ``local_only``: then `None` if it is not there)."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError

    repo = suite.source.split(":", 1)[1]
    try:
        if suite.file:
            return Path(hf_hub_download(repo, suite.file, repo_type="dataset", local_files_only=local_only))
        snapshot = Path(snapshot_download(repo, repo_type="dataset", allow_patterns=["*.csv", "*.parquet", "*.jsonl"],
                                          local_files_only=local_only))  # fmt: skip
    except LocalEntryNotFoundError:
        if local_only:
            return None
        raise
    except GatedRepoError as e:
        raise _unavailable(suite, "it is gated: accept its conditions on that page and log in (`huggingface-cli login`)") from e
    except (HfHubHTTPError, OSError) as e:
        raise _unavailable(suite, f"the download failed ({type(e).__name__}: {e})") from e
    files = sorted(p for p in snapshot.rglob("*") if p.suffix in (".csv", ".parquet", ".jsonl") and p.is_file())
    if len(files) != 1:
        raise ValueError(f"`--suite` {suite.name}: {repo} holds {len(files)} data files ({[p.name for p in files][:5]}); "
                         "pass the one to use with `--prompts PATH`.")  # fmt: skip
    return files[0]


def suite_file(suite: Suite) -> Path:
    """The suite's prompt file on this machine, downloaded once (cached under ``cache_dir()/suites/<name>``
    or the hub cache).

    Raises:
        HubUnavailableError: the file is not cached and cannot be downloaded now (``HF_HUB_OFFLINE``,
            no network, a gated dataset without access); the message names the source and ``--prompts``.
    """
    hub = suite.source.startswith("hf-dataset:")
    cached = _download_hub(suite, local_only=True) if hub else _cached(suite)
    if cached is not None:
        return cached
    if is_offline():
        raise _unavailable(suite, "HF_HUB_OFFLINE=1 is set (no downloads)")
    host = "huggingface.co" if hub else (urlparse(suite.source).hostname or "")
    if not _reachable(host):
        raise _unavailable(suite, f"{host} cannot be reached from this machine (no network)")
    path = _download_hub(suite) if hub else _download_url(suite, _suite_folder(suite))
    logger.info("Downloaded the %s suite from %s to %s.", suite.name, suite.source_text, path)
    return path
