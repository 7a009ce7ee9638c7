"""Image-fidelity metrics: what a safe encoder costs on the images it should leave alone.

Everything here works on images or features in memory; :mod:`~safer_diffusion.evaluation.fidelity_run`
runs it over an evaluation folder. The metrics, and the conventions they follow:

* **SSIM** (:func:`ssim`): Wang et al. 2004 with an 11-tap Gaussian window (sigma 1.5), K1 = 0.01,
  K2 = 0.03, data range 255, per RGB channel then averaged; only positions where the whole window
  lies inside the image count. This is exactly scikit-image's
  ``structural_similarity(a, b, channel_axis=-1, data_range=255, gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False)`` (and torchmetrics' default SSIM up to its border handling),
  computed in torch, batched, on any device.
* **PSNR** (:func:`psnr_db`): ``10 log10(255^2 / MSE)`` over all pixels and channels. Identical images
  have MSE 0 and PSNR +inf; :func:`psnr_db` returns ``math.inf`` for them and the stored rows
  write ``psnr_db: null`` with ``identical: true`` (JSON has no infinity).
* **CLIP** (:class:`ClipModel`): image and text embeddings (the projected, L2-normalised pooled
  outputs). :func:`clip_score` is the paper convention ``100 * max(cos(image, text), 0)``
  (Hessel et al. 2021 with w = 100, as torchmetrics' ``CLIPScore``); the paired image-image
  similarity is the plain cosine of the two image embeddings.
* **LPIPS** (:func:`load_lpips`): the ``lpips`` package (Zhang et al. 2018, v0.1 linear heads), only
  when the package and its backbone weights are available; otherwise it is reported as skipped
  with the reason (never downloaded on an offline machine).
* **FID** (:func:`frechet_distance`, :func:`fid_from_features`) and **KID**
  (:func:`kid_from_features`): computed here on feature arrays, so any feature extractor plugs in.
  FID = ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrtm(S1 S2))`` (float64, ``scipy.linalg.sqrtm``); KID =
  the unbiased MMD^2 with the cubic polynomial kernel ``k(x, y) = (x.y / d + 1)^3``, averaged over
  random subsets (as torch-fidelity and the KID paper, Binkowski et al. 2018).
* **Feature extractors** (:func:`build_feature_extractor`): ``inception`` is torch-fidelity's
  ``FeatureExtractorInceptionV3`` (the TF-ported FID network, 2048-d pool features; torchmetrics'
  FID uses the same network and weights). Its weights load the way torch-fidelity loads them:
  ``torch.hub.load_state_dict_from_url`` of the URL the library names, cached as
  ``<torch.hub.get_dir()>/checkpoints/weights-inception-2015-12-05-6726825d.pth``. On an offline
  machine (``HF_HUB_OFFLINE=1``) without that file the error names it. ``clip`` uses the CLIP
  model's image embeddings (Frechet CLIP distance; not comparable with published FID numbers).
  ``MODULE:FACTORY`` imports ``FACTORY(device=...)``, which returns a callable
  ``images -> (N, D) array``.
* **Encoder drift** (:func:`encoder_drift`): no images. For every prompt and text encoder, the
  cosine of its pooled embedding with the reference encoder's and the mean over the token
  positions of the squared Euclidean distance between the token hidden states the UNet reads
  (tokenised as ``StableDiffusionPipeline.encode_prompt`` does; the last hidden state of the
  encoder as loaded, which for SD 2.x is already the penultimate OpenCLIP layer).

Heavy libraries (torch, transformers, scipy) are imported inside the functions.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..hub import HubUnavailableError, is_offline, resolve_model_source
from ..options import DEFAULT_CLIP_MODEL, BadInputError

logger = logging.getLogger(__name__)

__all__ = [
    "FEATURE_EXTRACTORS",
    "IMAGE_EXTENSIONS",
    "LPIPS_NETS",
    "SSIM_SETTINGS",
    "ClipFeatureExtractor",
    "ClipModel",
    "InceptionFeatureExtractor",
    "LpipsMetric",
    "batched",
    "build_feature_extractor",
    "center_crop_resize",
    "check_feature_extractor",
    "check_fidelity_options",
    "check_fidelity_sources",
    "clip_score",
    "cosine",
    "describe_feature_extractor",
    "encoder_drift",
    "feature_statistics",
    "fid_from_features",
    "fidelity_feature_spec",
    "frechet_distance",
    "images_to_tensor",
    "inception_weights_file",
    "kid_from_features",
    "load_lpips",
    "mse",
    "open_rgb",
    "psnr_db",
    "quiet_model_loading",
    "resolve_clip_source",
    "ssim",
]

#: File name endings read as images (real-image folders).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
#: The SSIM settings (recorded with the results).
SSIM_SETTINGS = {"window": 11, "sigma": 1.5, "k1": 0.01, "k2": 0.03, "data_range": 255, "channels": "RGB, averaged"}
#: Named feature extractors for FID/KID (``MODULE:FACTORY`` is also accepted).
FEATURE_EXTRACTORS = ("inception", "clip", "none")
#: LPIPS backbones of the ``lpips`` package.
LPIPS_NETS = ("alex", "vgg", "squeeze")
_FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


# ---------------------------------------------------------------------------------------------------- images


def images_to_tensor(images: Sequence[Any], argument: str = "images") -> Any:
    """``(N, 3, H, W)`` uint8 tensor of RGB images (PIL images or ``(H, W, 3)`` uint8 arrays), all one size.

    Raises:
        ValueError: the images differ in size (naming the two sizes), or one is not an RGB image.
    """
    import numpy as np
    import torch

    arrays = []
    for i, image in enumerate(images):
        a = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
        if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
            raise ValueError(f"`{argument}[{i}]` must be an RGB image (H, W, 3) of uint8, got shape {a.shape} {a.dtype}.")
        if arrays and a.shape != arrays[0].shape:
            raise ValueError(f"`{argument}` mixes image sizes: {arrays[0].shape[1]}x{arrays[0].shape[0]} and "
                             f"{a.shape[1]}x{a.shape[0]} (image {i}); compare images of one size.")  # fmt: skip
        arrays.append(a)
    if not arrays:
        raise ValueError(f"`{argument}` is empty.")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _pair(x: Any, y: Any) -> tuple[Any, Any]:
    import torch

    if not (torch.is_tensor(x) and torch.is_tensor(y)):
        raise TypeError("`x` and `y` must be tensors (see `images_to_tensor`).")
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"`x` and `y` must be two (N, C, H, W) batches of one shape, got {tuple(x.shape)} and {tuple(y.shape)}.")
    return x, y


def _gaussian_window(size: int, sigma: float, dtype: Any, device: Any) -> Any:
    import torch

    half = (size - 1) / 2.0
    t = torch.arange(size, dtype=torch.float64) - half
    w = torch.exp(-(t**2) / (2.0 * sigma**2))
    return (w / w.sum()).to(dtype=dtype, device=device)


def ssim(x: Any, y: Any, data_range: float = 255.0, dtype: Any = None) -> Any:
    """Per-image SSIM of two ``(N, C, H, W)`` batches (uint8 or float on ``[0, data_range]``).

    The Gaussian-window SSIM of scikit-image (``gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False``), averaged over channels and over the positions whose 11 x 11
    window lies inside the image. Computed in ``dtype``: by default float64 on the CPU (matches
    scikit-image to 1e-10) and float32 on a GPU; float32 on the CPU is ~3x faster and within 1e-4
    (each pair is centred on its mean first, so ``E[x^2] - mu^2`` keeps its precision).

    Returns:
        ``(N,)`` float tensor; identical images give exactly 1.

    Raises:
        ValueError: the shapes differ or an image is smaller than the 11-pixel window.
    """
    import torch
    import torch.nn.functional as F

    x, y = _pair(x, y)
    size, sigma = SSIM_SETTINGS["window"], SSIM_SETTINGS["sigma"]
    n, c, h, w = x.shape
    if h < size or w < size:
        raise ValueError(f"SSIM needs images of at least {size}x{size} pixels, got {w}x{h}.")
    if dtype is None:
        dtype = torch.float64 if x.device.type == "cpu" else torch.float32
    x, y = x.to(dtype), y.to(dtype)
    # (co)variances are shift-invariant: centring each pair on its mean keeps low precision accurate
    shift = (x.mean(dim=(2, 3), keepdim=True) + y.mean(dim=(2, 3), keepdim=True)) / 2
    x, y = x - shift, y - shift
    g = _gaussian_window(size, sigma, dtype, x.device)
    stack = torch.cat([x, y, x * x, y * y, x * y], dim=1)  # (N, 5C, H, W)
    k = stack.shape[1]
    stack = F.conv2d(stack, g.view(1, 1, 1, size).expand(k, 1, 1, size), groups=k)
    stack = F.conv2d(stack, g.view(1, 1, size, 1).expand(k, 1, size, 1), groups=k)
    mu_x, mu_y, xx, yy, xy = stack.split(c, dim=1)
    var_x, var_y, cov = xx - mu_x * mu_x, yy - mu_y * mu_y, xy - mu_x * mu_y
    mu_x, mu_y = mu_x + shift, mu_y + shift
    c1 = (SSIM_SETTINGS["k1"] * data_range) ** 2
    c2 = (SSIM_SETTINGS["k2"] * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(dim=1)


def mse(x: Any, y: Any) -> Any:
    """Per-image mean squared error of two ``(N, C, H, W)`` batches, in float64 (pixel units squared)."""
    import torch

    x, y = _pair(x, y)
    d = x.to(torch.float64) - y.to(torch.float64)
    return (d * d).flatten(1).mean(dim=1)


def psnr_db(mse_value: float, data_range: float = 255.0) -> float:
    """``10 log10(data_range^2 / mse)`` in dB; ``math.inf`` for identical images (``mse == 0``)."""
    mse_value = float(mse_value)
    if mse_value < 0 or math.isnan(mse_value):
        raise ValueError(f"`mse` must be >= 0, got {mse_value}.")
    if mse_value == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse_value)


# ---------------------------------------------------------------------------------------------------- CLIP


def cosine(a: Any, b: Any) -> Any:
    """Row-wise cosine similarity of two ``(N, D)`` tensors."""
    import torch.nn.functional as F

    return F.cosine_similarity(a.float(), b.float(), dim=-1)


def clip_score(image_embeds: Any, text_embeds: Any) -> Any:
    """CLIP score per row: ``100 * max(cos(image, text), 0)`` (the paper convention, torchmetrics' ``CLIPScore``)."""
    return 100.0 * cosine(image_embeds, text_embeds).clamp(min=0.0)


@contextlib.contextmanager
def quiet_model_loading():
    """No loading bars or load reports from transformers/diffusers while a metric model loads (restored afterwards)."""
    import diffusers.utils.logging as df_logging
    from transformers.utils import logging as hf_logging

    state = [(m, m.is_progress_bar_enabled(), m.get_verbosity()) for m in (hf_logging, df_logging)]
    for m, _, _ in state:
        m.disable_progress_bar()
        m.set_verbosity_error()
    try:
        yield
    finally:
        for m, enabled, level in state:
            m.set_verbosity(level)
            if enabled:
                m.enable_progress_bar()


def _clip_example(argument: str) -> str:
    return (f"`{argument} /path/to/clip-vit-large-patch14` (a folder saved with `CLIPModel.save_pretrained`, holding config.json "
            "and model.safetensors)")  # fmt: skip


def resolve_clip_source(source: str, argument: str = "--clip_model") -> str:
    """``source`` as :func:`~safer_diffusion.hub.resolve_model_source` resolves it; offline errors also show a local-folder example.

    Raises:
        HubUnavailableError: a hub id that cannot be loaded now (offline, not cached).
        FileNotFoundError: neither an existing path nor a hub id.
    """
    try:
        return resolve_model_source(source, argument=argument)
    except HubUnavailableError as e:
        raise HubUnavailableError(f"{e} For example {_clip_example(argument)}.") from None


class ClipModel:
    """A CLIP model for CLIP score, image-image cosine and CLIP features.

    Args:
        model: a ``transformers.CLIPModel``.
        image_processor: its ``CLIPImageProcessor``.
        tokenizer: its tokenizer.
        name: the id recorded with the results (hub id or folder).
        device: where it runs.
    """

    def __init__(self, model: Any, image_processor: Any, tokenizer: Any, name: str, device: Any = "cpu"):
        self.model = model.eval()
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.name = name
        self.device = device

    @classmethod
    def load(cls, source: str, device: Any = "cpu", dtype: Any = None, argument: str = "--clip_model", name: str | None = None) -> ClipModel:
        """Load a ``CLIPModel`` folder or hub id (safetensors weights only), offline-aware.

        Raises:
            HubUnavailableError: a hub id on an offline machine that does not have it cached; the
                message names ``argument`` and asks for a local folder.
            BadInputError: the source exists but is not a loadable CLIP model folder.
        """
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        resolved = resolve_clip_source(source, argument)
        kwargs = {"local_files_only": True} if is_offline() else {}
        try:
            with quiet_model_loading():
                model = CLIPModel.from_pretrained(resolved, use_safetensors=True, dtype=dtype, **kwargs)
                processor = CLIPImageProcessor.from_pretrained(resolved, **kwargs)
                tokenizer = CLIPTokenizer.from_pretrained(resolved, **kwargs)
        except OSError as e:
            offline = " offline" if is_offline() else ""
            raise BadInputError(
                f"`{argument}`={source!r} cannot be loaded{offline} as a CLIP model ({' '.join(str(e).split())[:300]}). "
                f"Pass a local CLIP folder, e.g. {_clip_example(argument)}."
            ) from None
        return cls(model.to(device), processor, tokenizer, name or str(source), device)

    def describe(self) -> dict[str, Any]:
        cfg = self.model.config
        return {"model": self.name, "projection_dim": int(cfg.projection_dim), "image_size": int(cfg.vision_config.image_size)}

    def _dtype(self) -> Any:
        return next(self.model.parameters()).dtype

    def image_features(self, images: Sequence[Any], normalize: bool = True) -> Any:
        """``(N, D)`` float32 projected image embeddings (L2-normalised unless ``normalize=False``), on the CPU."""
        import torch

        pixels = self.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            pooled = self.model.vision_model(pixel_values=pixels.to(self.device, self._dtype())).pooler_output
            emb = self.model.visual_projection(pooled).float()
        if normalize:
            emb = emb / emb.norm(dim=-1, keepdim=True)
        return emb.cpu()

    def text_features(self, texts: Sequence[str], normalize: bool = True) -> Any:
        """``(N, D)`` float32 projected text embeddings (77 tokens, truncated), on the CPU."""
        import torch

        tokens = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.tokenizer.model_max_length,
                                return_tensors="pt")  # fmt: skip
        with torch.inference_mode():
            out = self.model.text_model(input_ids=tokens["input_ids"].to(self.device),
                                        attention_mask=tokens["attention_mask"].to(self.device))  # fmt: skip
            emb = self.model.text_projection(out.pooler_output).float()
        if normalize:
            emb = emb / emb.norm(dim=-1, keepdim=True)
        return emb.cpu()


# ---------------------------------------------------------------------------------------------------- LPIPS


class LpipsMetric:
    """LPIPS distance of image pairs through an ``lpips.LPIPS`` network (lower = more similar)."""

    def __init__(self, network: Any, net: str, device: Any = "cpu"):
        self.network = network.eval().to(device)
        self.net = net
        self.device = device

    def __call__(self, x: Any, y: Any) -> Any:
        """``(N,)`` distances of two uint8 ``(N, 3, H, W)`` batches."""
        import torch

        x, y = _pair(x, y)
        with torch.inference_mode():
            a = x.to(self.device, torch.float32) / 127.5 - 1.0
            b = y.to(self.device, torch.float32) / 127.5 - 1.0
            return self.network(a, b).flatten().float().cpu()

    def describe(self) -> dict[str, Any]:
        return {"package": "lpips", "net": self.net, "version": "0.1"}


def _lpips_backbone_file(net: str) -> str:
    from torchvision import models

    weights = {"alex": models.AlexNet_Weights, "vgg": models.VGG16_Weights, "squeeze": models.SqueezeNet1_1_Weights}[net]
    return weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]


def load_lpips(net: str = "alex", device: Any = "cpu") -> tuple[LpipsMetric | None, str | None]:
    """``(metric, None)`` when LPIPS can run here, else ``(None, reason it is skipped)``.

    LPIPS needs the ``lpips`` package (its linear heads ship inside it) and the torchvision
    backbone weights (``<torch.hub.get_dir()>/checkpoints/<file>``). On an offline machine
    (``HF_HUB_OFFLINE=1``) a backbone that is not cached is not downloaded: LPIPS is skipped.
    """
    import torch

    if net not in LPIPS_NETS:
        raise ValueError(f"`--lpips_net` must be one of {list(LPIPS_NETS)}, got {net!r}.")
    try:
        lpips = importlib.import_module("lpips")
    except ImportError:
        return None, "the `lpips` package is not installed (`pip install lpips`)"
    try:
        backbone = _lpips_backbone_file(net)
    except (ImportError, AttributeError) as e:
        return None, f"torchvision cannot name the {net} backbone weights ({e})"
    cached = Path(torch.hub.get_dir()) / "checkpoints" / backbone
    if not cached.is_file() and is_offline():
        return None, f"its backbone weights {cached} are not on this offline machine (run once online, or copy the file there)"
    try:
        network = lpips.LPIPS(net=net, verbose=False)
    except Exception as e:  # noqa: BLE001 - any failure to build it means "not available here", reported as skipped
        return None, f"lpips.LPIPS(net={net!r}) could not be built ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
    return LpipsMetric(network, net, device), None


# ---------------------------------------------------------------------------------------------------- FID / KID


def feature_statistics(features: Any) -> tuple[Any, Any]:
    """``(mean, covariance)`` of an ``(N, D)`` feature array, float64 (covariance with N - 1)."""
    import numpy as np

    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"`features` must be an (N, D) array with N >= 2, got shape {f.shape}.")
    if not np.isfinite(f).all():
        raise ValueError("`features` holds non-finite values; the feature extractor failed on some images.")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, eps: float = 1e-6) -> float:
    """Frechet distance of two Gaussians: ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrtm(S1 S2))``.

    ``sqrtm`` is ``scipy.linalg.sqrtm`` in float64. When the product is singular enough that the
    square root is not finite, ``eps * I`` is added to both covariances (as pytorch-fid does), with
    a warning. A small imaginary part from rounding is dropped; a large one is logged.
    """
    import numpy as np
    import scipy.linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"Mismatched statistics: means {mu1.shape} / {mu2.shape}, covariances {s1.shape} / {s2.shape}.")
    diff = mu1 - mu2
    with warnings.catch_warnings():
        # a rank-deficient covariance (fewer images than features) is reported once in the results, not per call
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            logger.warning("FID: the covariance product is singular; adding %g to the diagonals.", eps)
            offset = np.eye(s1.shape[0]) * eps
            covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        imag = float(np.max(np.abs(covmean.imag))) if covmean.size else 0.0
        if imag > 1e-3:
            logger.warning("FID: sqrtm has an imaginary component of %.3g (too few images for the feature width?).", imag)
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def fid_from_features(features1: Any, features2: Any) -> float:
    """FID of two ``(N, D)`` feature arrays (see :func:`frechet_distance`)."""
    mu1, s1 = feature_statistics(features1)
    mu2, s2 = feature_statistics(features2)
    return frechet_distance(mu1, s1, mu2, s2)


def kid_from_features(features1: Any, features2: Any, n_subsets: int = 100, subset_size: int = 1000,
                      seed: int = 0) -> dict[str, float]:  # fmt: skip
    """KID: the unbiased MMD^2 with kernel ``(x.y / d + 1)^3``, mean and std over random subsets.

    Each subset draws ``m = min(subset_size, N1, N2)`` rows of each set without replacement; with
    ``K_xx, K_yy, K_xy`` the kernel matrices, ``MMD^2 = (sum K_xx - tr K_xx + sum K_yy - tr K_yy) /
    (m (m - 1)) - 2 sum K_xy / m^2``.

    Returns:
        ``{"kid": mean, "kid_std": std over subsets, "subset_size": m, "n_subsets": n_subsets}``.
    """
    import numpy as np

    x_all = np.asarray(features1, dtype=np.float64)
    y_all = np.asarray(features2, dtype=np.float64)
    if x_all.ndim != 2 or y_all.ndim != 2 or x_all.shape[1] != y_all.shape[1]:
        raise ValueError(f"`features1` and `features2` must be (N, D) arrays of one width, got {x_all.shape} and {y_all.shape}.")
    m = min(int(subset_size), x_all.shape[0], y_all.shape[0])
    if m < 2:
        raise ValueError(f"KID needs at least 2 images in each set, got {x_all.shape[0]} and {y_all.shape[0]}.")
    if n_subsets < 1:
        raise ValueError(f"`n_subsets` must be >= 1, got {n_subsets}.")
    d = x_all.shape[1]
    rng = np.random.default_rng(seed)
    values = np.empty(n_subsets)
    for i in range(n_subsets):
        x = x_all[rng.choice(x_all.shape[0], m, replace=False)]
        y = y_all[rng.choice(y_all.shape[0], m, replace=False)]
        kxx = (x @ x.T / d + 1.0) ** 3
        kyy = (y @ y.T / d + 1.0) ** 3
        kxy = (x @ y.T / d + 1.0) ** 3
        values[i] = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2.0 * kxy.sum() / (m * m)
    return {"kid": float(values.mean()), "kid_std": float(values.std()), "subset_size": m, "n_subsets": int(n_subsets)}


# ---------------------------------------------------------------------------------------------------- feature extractors


def inception_weights_file() -> tuple[Path, str]:
    """``(cached path, URL)`` of torch-fidelity's InceptionV3 weights, as the library names them."""
    import torch

    module = importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
    url = module.URL_INCEPTION_V3
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1], url


class InceptionFeatureExtractor:
    """torch-fidelity's InceptionV3 (``inception-v3-compat``), 2048-d pool features: the FID standard.

    The weights load the way torch-fidelity loads them (``torch.hub.load_state_dict_from_url``,
    cached under ``torch.hub.get_dir()/checkpoints``). Images of any size are resized to 299 x 299
    inside the network (TF-compatible bilinear), as in published FID code.
    """

    name = "inception"

    def __init__(self, device: Any = "cpu", batch_size: int = 32):
        fe = importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
        self.network = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).eval().to(device)
        self.device = device
        self.batch_size = batch_size

    def __call__(self, images: Sequence[Any]) -> Any:
        import numpy as np
        import torch

        out = []
        for i in range(0, len(images), self.batch_size):
            x = images_to_tensor(images[i : i + self.batch_size]).to(self.device)
            with torch.inference_mode():
                out.append(self.network(x)[0].double().cpu().numpy())
        return np.concatenate(out)

    def describe(self) -> dict[str, Any]:
        path, _ = inception_weights_file()
        return {"name": "inception", "library": "torch-fidelity", "network": "inception-v3-compat", "features": "2048 (pool3)",
                "weights": path.name}  # fmt: skip


class ClipFeatureExtractor:
    """The CLIP model's projected image embeddings (not normalised) as FID/KID features (Frechet CLIP distance)."""

    name = "clip"

    def __init__(self, clip: ClipModel, batch_size: int = 32):
        self.clip = clip
        self.batch_size = batch_size

    def __call__(self, images: Sequence[Any]) -> Any:
        import numpy as np

        out = [self.clip.image_features(images[i : i + self.batch_size], normalize=False).double().numpy()
               for i in range(0, len(images), self.batch_size)]  # fmt: skip
        return np.concatenate(out)

    def describe(self) -> dict[str, Any]:
        return {"name": "clip", "model": self.clip.name, "features": f"{self.clip.model.config.projection_dim} (image_embeds)",
                "note": "Frechet CLIP distance; not comparable with Inception FID"}  # fmt: skip


def check_feature_extractor(spec: str, argument: str = "--fid_feature_extractor") -> None:
    """Check that ``spec`` can be built here, without building it (called before any work).

    Raises:
        BadInputError: an unknown spec, torch-fidelity missing for ``inception``, a ``MODULE:FACTORY`` that does not import.
        HubUnavailableError: ``inception`` on an offline machine whose torch hub cache lacks the weights file.
    """
    if spec in ("none", "clip"):
        return
    if spec == "inception":
        try:
            path, url = inception_weights_file()
        except ImportError:
            raise BadInputError(
                f"`{argument} inception` needs torch-fidelity (its InceptionV3, the network torchmetrics' FID uses too), which is "
                f"not installed: `pip install torch-fidelity`; or pass `{argument} clip` (Frechet CLIP distance) or `none`."
            ) from None
        if not path.is_file() and is_offline():
            raise HubUnavailableError(
                f"`{argument} inception` needs torch-fidelity's InceptionV3 weights {path.name}, which are not in the torch hub cache "
                f"({path}) and HF_HUB_OFFLINE=1 is set. Copy the file there (download it once from {url}), or pass "
                f"`{argument} clip` / `none`."
            )
        return
    if not _FACTORY_RE.match(spec):
        raise BadInputError(f"`{argument}` must be one of {list(FEATURE_EXTRACTORS)} or MODULE:FACTORY, got {spec!r}.")
    module, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise BadInputError(f"`{argument}`={spec!r} cannot be imported ({type(e).__name__}: {e}).") from None
    if not callable(factory):
        raise BadInputError(f"`{argument}`={spec!r} is not callable; name a factory `FACTORY(device=...)` returning a feature extractor.")


def fidelity_feature_spec(spec: str, tiny: bool) -> str:
    """The FID feature extractor actually used: ``--tiny`` takes the tiny CLIP's features for ``inception``."""
    return "clip" if tiny and spec == "inception" else spec


def check_fidelity_options(clip_model: str, spec: str, tiny: bool, *, clip_argument: str = "--clip_model",
                           feature_argument: str = "--fid_feature_extractor") -> None:  # fmt: skip
    """The fidelity options' checks that read no image and load no model (``safer-diffusion fidelity`` and
    ``safer-diffusion evaluate --fidelity``): the CLIP model and the FID features, with ``--tiny`` or without.

    Raises:
        BadInputError: ``--tiny`` with another CLIP model or a ``MODULE:FACTORY`` extractor, an unknown extractor name.
    """
    if tiny and clip_model != DEFAULT_CLIP_MODEL:
        raise BadInputError(f"`--tiny` uses its own tiny CLIP; drop `{clip_argument}`, or drop `--tiny` to use it.")
    if ":" not in spec and spec not in FEATURE_EXTRACTORS:
        raise BadInputError(f"`{feature_argument}` must be inception, clip, none or MODULE:FACTORY, got {spec!r}.")
    if tiny and spec not in FEATURE_EXTRACTORS:
        raise BadInputError(f"`--tiny` takes its FID features from the tiny CLIP; drop `{feature_argument}` "
                            f"{spec!r} (or pass none), or drop `--tiny`.")  # fmt: skip


def check_fidelity_sources(clip_model: str, spec: str, tiny: bool, *, clip_argument: str = "--clip_model",
                           feature_argument: str = "--fid_feature_extractor") -> None:  # fmt: skip
    """That the CLIP model and the FID feature extractor can be loaded here (before any work; nothing is loaded).

    Raises:
        BadInputError / HubUnavailableError / FileNotFoundError: as :func:`check_feature_extractor` and
            :func:`resolve_clip_source`, naming the arguments.
    """
    check_feature_extractor(fidelity_feature_spec(spec, tiny), argument=feature_argument)
    if not tiny:
        resolve_clip_source(clip_model, argument=clip_argument)


def build_feature_extractor(spec: str, *, clip: ClipModel | None = None, device: Any = "cpu", batch_size: int = 32) -> Any:
    """The feature extractor named by ``spec`` (see :func:`check_feature_extractor`), or `None` for ``none``.

    A feature extractor is a callable ``images -> (N, D) array`` with an optional ``describe() -> dict``.
    """
    check_feature_extractor(spec)
    if spec == "none":
        return None
    if spec == "clip":
        if clip is None:
            raise ValueError("`--fid_feature_extractor clip` needs the CLIP model (`clip=`).")
        return ClipFeatureExtractor(clip, batch_size=batch_size)
    if spec == "inception":
        try:
            return InceptionFeatureExtractor(device=device, batch_size=batch_size)
        except OSError as e:  # urllib's URLError is an OSError: no network while downloading the weights
            path, url = inception_weights_file()
            raise HubUnavailableError(
                f"`--fid_feature_extractor inception` could not get torch-fidelity's InceptionV3 weights {path.name} ({e}). "
                f"Copy the file to {path} (from {url}), or pass `--fid_feature_extractor clip` / `none`."
            ) from None
    module, _, attr = spec.partition(":")
    extractor = getattr(importlib.import_module(module), attr)(device=device)
    if not callable(extractor):
        raise BadInputError(f"`--fid_feature_extractor`={spec!r} returned {type(extractor).__name__}, not a callable images -> features.")
    return extractor


def describe_feature_extractor(extractor: Any, spec: str) -> dict[str, Any]:
    """What is recorded about a feature extractor (its own ``describe()`` when it has one)."""
    described = extractor.describe() if hasattr(extractor, "describe") else {}
    return {"spec": spec, **described}


# ---------------------------------------------------------------------------------------------------- encoder drift


def _encode(encoder: Any, tokenizer: Any, texts: Sequence[str], device: Any) -> tuple[Any, Any]:
    """(pooled embeddings (N, D'), token hidden states (N, L, D)) as float64 on the CPU, tokenised like ``encode_prompt``."""
    import torch

    tokens = tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt")  # fmt: skip
    kwargs = {}
    if getattr(encoder.config, "use_attention_mask", False):
        kwargs["attention_mask"] = tokens["attention_mask"].to(device)
    with torch.inference_mode():
        out = encoder(tokens["input_ids"].to(device), **kwargs)
    pooled = getattr(out, "text_embeds", None)
    if pooled is None:
        pooled = out.pooler_output
    return pooled.double().cpu(), out.last_hidden_state.double().cpu()


def encoder_drift(
    encoders: Mapping[str, Any],
    tokenizer: Any,
    prompts: Mapping[str, str],
    reference: str = "original",
    device: Any = None,
    batch_size: int = 16,
) -> list[dict[str, Any]]:
    """Per prompt and encoder: how far its text embedding moved from the reference encoder's.

    Args:
        encoders: ``{variant: text encoder}`` (``CLIPTextModel`` or ``...WithProjection``), one of
            them ``reference``; each is run as loaded (an SD 2.x encoder is already cut to its
            penultimate layer by the pipeline), so the hidden states are the ones the UNet reads.
        tokenizer: the pipeline's tokenizer (``max_length`` padding, truncation, as ``encode_prompt``).
        prompts: ``{prompt_id: prompt}``.
        reference: the encoder the others are compared with.
        device: where the encoders run (default: each encoder's own device).
        batch_size: prompts per forward pass.

    Returns:
        one row per (prompt, non-reference variant): ``prompt_id``, ``variant``, ``pooled_cosine``
        (cosine of the pooled embeddings; ``text_embeds`` for encoders with a projection, else
        ``pooler_output``) and ``token_msd`` (mean over the token positions of the squared
        Euclidean distance of the last hidden states).
    """
    import torch
    import torch.nn.functional as F

    if reference not in encoders:
        raise ValueError(f"`reference` {reference!r} is not one of the encoders {sorted(encoders)}.")
    if not prompts:
        raise ValueError("`prompts` is empty.")
    ids = list(prompts)
    texts = [prompts[i] for i in ids]
    encoded: dict[str, tuple[Any, Any]] = {}
    for name, encoder in encoders.items():
        dev = device if device is not None else next(encoder.parameters()).device
        parts = [_encode(encoder, tokenizer, texts[i : i + batch_size], dev) for i in range(0, len(texts), batch_size)]
        encoded[name] = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    ref_pooled, ref_hidden = encoded[reference]
    rows = []
    for name, (pooled, hidden) in encoded.items():
        if name == reference:
            continue
        if hidden.shape != ref_hidden.shape:
            raise ValueError(f"encoder {name!r} produces hidden states {tuple(hidden.shape[1:])}, the reference "
                             f"{tuple(ref_hidden.shape[1:])}; it cannot condition the same UNet.")  # fmt: skip
        cos = F.cosine_similarity(pooled, ref_pooled, dim=-1) if pooled.shape == ref_pooled.shape else None
        msd = ((hidden - ref_hidden) ** 2).sum(dim=-1).mean(dim=-1)
        for j, pid in enumerate(ids):
            rows.append({"prompt_id": pid, "variant": name, "pooled_cosine": None if cos is None else float(cos[j]),
                         "token_msd": float(msd[j])})  # fmt: skip
    return rows


# ---------------------------------------------------------------------------------------------------- helpers


def open_rgb(path: str | os.PathLike) -> Any:
    """The image at ``path`` as an RGB PIL image, fully decoded (the file is closed)."""
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def center_crop_resize(image: Any, width: int, height: int) -> Any:
    """Center-crop ``image`` to the aspect ratio ``width:height``, then resize it to ``width x height`` (bicubic)."""
    from PIL import Image

    w, h = image.size
    target = width / height
    if w / h > target:
        new_w = round(h * target)
        box = ((w - new_w) // 2, 0, (w - new_w) // 2 + new_w, h)
    else:
        new_h = round(w / target)
        box = (0, (h - new_h) // 2, w, (h - new_h) // 2 + new_h)
    return image.crop(box).resize((width, height), Image.BICUBIC)


def batched(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    """``items`` in consecutive chunks of at most ``size`` (order kept)."""
    return [items[i : i + size] for i in range(0, len(items), size)]

