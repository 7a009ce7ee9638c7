"""Training-step throughput: precomputed anchors vs a live frozen reference; trimmed vs padded batches and the projected
wall time of the paper recipe; precision/attention backends; MFU.

    python -m benchmarks.bench_train                                  # CPU, tiny CLIP: anchors vs live reference
    python -m benchmarks.bench_train --size vit-l14 --device cuda     # + fp32 eager vs bf16 SDPA vs bf16 xformers, batch 256
    python -m benchmarks.bench_train --size vit-l14 --batch_size 8    # CPU: trimmed vs padded-to-77 at ViT-L/14 size

Part 1 (every device): one SaFeR-CLIP training step of the text tower (LoRA r16, Adam) on a batch of
B safe + B unsafe captions, timed interleaved in two variants on the same model:
``anchors`` takes T0(t), T0(t*), T0(t̂) from precomputed tensors (this project's default);
``live_reference`` runs the frozen reference forward on 3B captions every step with the adapters
disabled (the Safe-CLIP way of getting T0, at our precision); on CUDA also ``fp32_reference_copy``,
Safe-CLIP's public script: a separate fp32 CLIP copy run every step. Goal: anchors >= 2x steps/s.
Bound: with LoRA the backward costs about one forward (no weight gradients for frozen weights), so
anchors save at most (2F + 1.5F) / 2F = 1.75x against a same-precision live reference on 3B
captions; the 2x goal is reachable only against the fp32 copy.

Part padding (every device): the paper recipe's step (``finetune/configs/safer_clip_vit_l14.yaml``: LoRA r16 on the
text tower, Adam, clipping 1.0, bf16 autocast + SDPA on CUDA, fp32 on the CPU; the SaFeR-CLIP loss on B safe + B unsafe
captions with precomputed anchors) with every batch trimmed to its own longest caption (``finetune.train._trim``, what
the trainer does) vs padded to 77 tokens, timed interleaved on generated captions whose CLIP token counts are
log-normal (mean ``--caption_tokens_mean`` 20, shape ``--caption_tokens_sigma`` 0.25). Prints the caption lengths
(mean, median, max), tokens per step and steps/s of both, and the ratio (goal: >= 2.5x steps/s at batch 256 on
``--size vit-l14``). A trimmed batch is as long as its longest caption, so the gain shrinks as the batch grows;
``grouped`` is the same trimmed step on batches built by ``--group_by_length`` (``finetune.train.group_by_length``:
captions sorted by length within windows of ``length_group_steps`` = 50 steps, the steps then shuffled), whose
longest caption is close to their typical one.

Projection of the text-only paper recipe (``--recipe_pairs`` 150k pairs, 9 epochs, batch 48, tertile curriculum):

    minutes = (steps x mean trimmed step s at batch 48 + 2 N / anchor captions per s + nearest-safe search s) / 60

with N = pairs - round(val_fraction x pairs) trained pairs and steps = sum over epochs of ceil(|curriculum pool of
the epoch| / 48) (``finetune.train.epoch_plan``: epoch 1 trains the easy third, epoch 2 two thirds, then all:
23,753 steps for 150k pairs, not 150k x 9 / 48 = 28,125). The anchor rate is timed with
``finetune.anchors.encode_text`` (frozen fp32 model, one batch of ``anchor_batch_size`` 256 generated captions); the nearest-safe search
(N x N, on the training device, where the trainer runs it) from 1,024 unsafe rows. Model loading, checkpoint writes and the
end-of-training metrics are not included. The projection is printed for the paper recipe as it is (mixed-length batches)
and with ``--group_by_length``.

Part 2 (CUDA, ``--size vit-l14``): a ViT-L/14-size random-init text tower (hidden 768, 12 layers,
12 heads, MLP 3072, 77 tokens) trained with full fine-tuning at batch 256 (256 safe + 256 unsafe
sequences per step, anchors precomputed) in fp32 + eager attention, bf16 autocast + SDPA, and bf16 +
xformers (when importable). Goal: bf16 >= 3x fp32, MFU >= 35 %.

FLOPs per step, counted analytically (no profiler): with S sequences of L tokens, T = S*L tokens,
N = weights of the transformer's linear layers (q, k, v, out, fc1, fc2 of every layer; embeddings
excluded as they are lookups), d = hidden size, n_layers:

    matmul FLOPs  = 2*N*T (forward) + 2*N*T (input gradients) + 2*N_trained*T (weight gradients)
    attention     = 4*S*L^2*d*n_layers (forward: QK^T and AV) x 3 (forward + backward)

i.e. the usual 6*N*T + attention for full fine-tuning (N_trained = N). MFU = FLOPs / step time /
peak dense bf16 tensor FLOP/s of the GPU (``--peak_tflops`` or a built-in table: H100/H200 989,
A100 312), for every mode including fp32 (the same yardstick). The last line is one JSON object.
"""

from __future__ import annotations

import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/bench_train.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.timing import benchmark_main, dump_json_line, environment, print_table, time_interleaved  # noqa: E402
from safer_diffusion.options import device_option, option, resolve_device_and_dtype  # noqa: E402

PROG = "python -m benchmarks.bench_train"

PAPER_CONFIG = "safer_clip_vit_l14.yaml"  # finetune/configs: the paper recipe the projection is for
PAPER_PAIRS = 150_000  # ViSU-Text-size pair set (issue 16: "150k pairs x 9 epochs")
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "RTX 4090": 165.0}
SIZES = {
    "tiny": dict(hidden=32, layers=2, heads=2, mlp=64, batch=64),
    "vit-l14": dict(hidden=768, layers=12, heads=12, mlp=3072, batch=256),
}


def build_clip(size: str, seed: int = 0):
    """A random-init CLIPModel whose text tower has the given size (the vision tower is tiny: it is not trained here)."""
    from transformers import CLIPConfig, CLIPModel

    from safer_diffusion.tiny import tiny_text_config

    s = SIZES[size]
    text = tiny_text_config("sd1", hidden_size=s["hidden"], projection_dim=s["hidden"])
    text.num_hidden_layers, text.num_attention_heads, text.intermediate_size = s["layers"], s["heads"], s["mlp"]
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8,
                  projection_dim=s["hidden"])
    torch.manual_seed(seed)
    return CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision, projection_dim=s["hidden"])).eval()


def captions(n: int) -> list[str]:
    subjects = ["a woman", "a man", "two children", "an old dog", "a chef", "a cyclist", "a crowd", "a soldier"]
    places = ["in a park", "on a beach", "in a kitchen", "at a train station", "in the snow", "on a rooftop"]
    acts = ["is smiling", "holds a red umbrella", "is running fast", "waves at the camera", "is reading a long book"]
    return [f"{subjects[i % 8]} {acts[(i // 8) % 5]} {places[(i // 40) % 6]} photo number {i}" for i in range(n)]


# single-token words of the CLIP BPE (each word, and ",", is exactly one token): a caption of n words is n + 2 tokens
_WORDS = {
    "det": ("a", "the", "two", "three"),
    "adj": ("red", "blue", "old", "young", "small", "large", "wooden", "bright", "black", "white", "green", "yellow", "brown",
            "tall", "short", "happy"),
    "noun": ("man", "woman", "dog", "cat", "child", "chef", "street", "park", "beach", "kitchen", "table", "chair", "window", "car",
             "bike", "tree", "flower", "river", "lake", "mountain", "city", "house", "door", "room", "hat", "coat", "dress",
             "jacket", "shirt", "people", "group"),
    "verb": ("holds", "walks", "sits", "stands", "looking", "smiling", "running", "reading", "eating", "drinking", "playing",
             "wearing"),
    "prep": ("near", "under", "beside", "with", "on", "in", "at", "of"),
    ",": (",",),
}
_PATTERN = ("det", "adj", "noun", "verb", "prep", "det", "adj", "noun", ",")


def realistic_captions(n: int, mean_tokens: float = 20.0, sigma: float = 0.25, seed: int = 0) -> list[str]:
    """``n`` everyday captions whose CLIP token counts (with BOS/EOS) are log-normal with mean ``mean_tokens`` and shape
    ``sigma`` (coefficient of variation about ``sigma``; 0.25 is about the spread of COCO captions), clipped to [4, 77].

    The words cycle through determiner, adjective, noun, verb, preposition, ... so a caption of k words is exactly
    k + 2 tokens; the lengths reported by the benchmark are counted by the tokenizer all the same.
    """
    import random

    rng = random.Random(seed)
    median = mean_tokens / math.exp(sigma**2 / 2)
    out = []
    for _ in range(n):
        length = min(77, max(4, round(rng.lognormvariate(math.log(median), sigma))))
        out.append(" ".join(rng.choice(_WORDS[_PATTERN[i % len(_PATTERN)]]) for i in range(length - 2)))
    return out


def _apply(loss, optimizer, device):
    """Backward, optimizer step and (on CUDA) a sync, so every timed step ends when its work does."""
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return loss


def make_step(model, optimizer, loss_fn, batch: dict, anchors: dict | None, device, autocast_dtype):
    """One training step closure. ``anchors=None``: run the frozen reference forward (adapters disabled) every step."""
    B = batch["ids"].shape[0] // 2

    def step():
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = model(input_ids=batch["ids"], attention_mask=batch["mask"])["text"]
            if anchors is None:
                ref, _ = model.reference_text(batch["ref_ids"], batch["ref_mask"])
                t0, t0_star, t0_hat = ref[:B], ref[B : 2 * B], ref[2 * B :]
            else:
                t0, t0_star, t0_hat = anchors["t0"], anchors["t0_star"], anchors["t0_hat"]
            loss = loss_fn(t=out[:B], t_star=out[B:], t0=t0, t0_star=t0_star, t0_hat=t0_hat)["loss"]
        return _apply(loss, optimizer, device)

    return step


def prepare(size: str, finetune: str, batch_size: int, device, attention: str, weight_dtype, live: bool, pad_to_max: bool = False):
    from finetune.losses import SaferClipLoss
    from finetune.modeling import SaferCLIP, check_attention
    from safer_diffusion.tiny import clip_tokenizer

    check_attention(attention, device)
    clip = build_clip(size)
    clip.set_attn_implementation(attention)
    model = SaferCLIP(clip, finetune=finetune, weight_dtype=weight_dtype, keep_frozen_copy=finetune == "full" and live).to(device)
    model.train()
    if finetune == "full" and live and model.frozen_copy is not None:
        model.frozen_copy[0].to(device)
    tok = clip_tokenizer()
    caps = captions(3 * batch_size)
    # part 1 pads to the longest caption as the trainer does; part 2 uses the full 77-token context (FLOPs below use L=77)
    enc = tok(caps, padding="max_length" if pad_to_max else "longest", max_length=77, truncation=True, return_tensors="pt")
    ids, mask = enc.input_ids.to(device), enc.attention_mask.to(device)
    batch = {"ids": ids[: 2 * batch_size], "mask": mask[: 2 * batch_size], "ref_ids": ids, "ref_mask": mask}
    d = clip.config.projection_dim
    gen = torch.Generator().manual_seed(0)
    anchors = {k: torch.nn.functional.normalize(torch.randn(batch_size, d, generator=gen), dim=-1).to(device)
               for k in ("t0", "t0_star", "t0_hat")}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-4)
    return model, optimizer, SaferClipLoss(), batch, anchors


def make_copy_step(model, optimizer, loss_fn, batch: dict, reference, device, autocast_dtype):
    """Safe-CLIP's public script: a separate fp32 frozen CLIP forward every step (T0(t), T0(t*))."""
    B = batch["ids"].shape[0] // 2

    def step():
        with torch.no_grad():
            ref = reference.get_text_features(input_ids=batch["ids"], attention_mask=batch["mask"]).pooler_output
            ref = torch.nn.functional.normalize(ref.float(), dim=-1)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = model(input_ids=batch["ids"], attention_mask=batch["mask"])["text"]
            loss = loss_fn(t=out[:B], t_star=out[B:], t0=ref[:B], t0_star=ref[B:], t0_hat=ref[:B])["loss"]
        return _apply(loss, optimizer, device)

    return step


def step_flops(size: str, finetune: str, sequences: int, model, live_sequences: int = 0, length: int = 77) -> float:
    s = SIZES[size]
    d, n_layers = s["hidden"], s["layers"]
    n_linear = n_layers * (4 * d * d + 2 * d * s["mlp"])
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad) if finetune == "lora" else n_linear
    tokens = sequences * length
    attn_fwd = 4 * sequences * length**2 * d * n_layers
    train = 2 * n_linear * tokens + 2 * n_linear * tokens + 2 * n_trained * tokens + 3 * attn_fwd
    live = 2 * n_linear * live_sequences * length + 4 * live_sequences * length**2 * d * n_layers
    return float(train + live)


# --------------------------------------------------------------------------- part "padding" + the paper-recipe projection
def paper_recipe():
    """The paper recipe (``finetune/configs/safer_clip_vit_l14.yaml``) resolved as the trainer resolves it for caption-only
    data (ViSU-Text has no images): curriculum, loss weights, LoRA settings, batch size, precision."""
    import yaml

    from finetune.config import CONFIG_DIR, TrainConfig

    path = CONFIG_DIR / PAPER_CONFIG
    return TrainConfig.from_dict(yaml.safe_load(path.read_text(encoding="utf-8")), source=str(path)).resolve(
        safe_images=False, unsafe_images=False)


def recipe_steps(cfg, pairs: int) -> dict:
    """Training steps of ``cfg`` on ``pairs`` loaded pairs, one process: ``val_fraction`` held out as the trainer does
    (``round(val_fraction * pairs)``, distinct safe captions assumed), then the curriculum's epoch plan
    (:func:`finetune.train.epoch_plan`: epoch e trains ceil(|pool_e| / B) steps, pool_e = the stages joined by then)."""
    from finetune.curriculum import Curriculum
    from finetune.train import epoch_plan

    n_train = pairs - int(cfg.val_fraction * pairs + 0.5)
    # stage sizes depend only on the number of pairs and the boundaries, not on the difficulty values
    cur = Curriculum(torch.linspace(1.0, 0.0, n_train), mode=cfg.curriculum, boundaries=tuple(cfg.curriculum_boundaries),
                     stage_epochs=tuple(cfg.curriculum_stage_epochs))
    plan = epoch_plan(cur, cfg.num_train_epochs, cfg.train_batch_size)
    return {"pairs": pairs, "train_pairs": n_train, "steps_per_epoch": plan, "steps": sum(plan),
            "steps_naive": math.ceil(pairs * cfg.num_train_epochs / cfg.train_batch_size), "stage_sizes": cur.stage_sizes()}


def _token_batches(tok, n_batches: int, batch: int, args, seed: int, window: int) -> list[dict]:
    """``n_batches`` trainer batches of ``batch`` safe + ``batch`` unsafe captions, tokenised as finetune.train does
    (``_tokenize``: padded to the longest caption of the whole set), each trimmed (``_trim``, the trainer), padded to 77
    (``_pad_to``), and ``grouped``: ``n_batches`` steps of one ``--group_by_length`` window of ``window`` steps
    (``finetune.train.group_by_length`` on the same kind of captions), trimmed, picked evenly over the window's steps
    ordered by length so that their mean is the window's. Also returns the mean tokens per step over the whole window."""
    from finetune.train import _pad_to, _tokenize, _trim, group_by_length

    steps = max(n_batches, window)
    caps = realistic_captions(2 * batch * steps, args.caption_tokens_mean, args.caption_tokens_sigma, seed=seed)
    ids, mask = _tokenize(tok, caps, 77)
    safe, unsafe = slice(0, batch * steps), slice(batch * steps, 2 * batch * steps)
    order = torch.arange(batch * steps)
    order_u, order_s = group_by_length(order, order, mask[unsafe].sum(1), mask[safe].sum(1), batch, window, seed, 1)
    grouped_steps = [torch.cat([order_s[batch * k : batch * (k + 1)], batch * steps + order_u[batch * k : batch * (k + 1)]])
                     for k in range(steps)]  # fmt: skip
    step_len = torch.tensor([int(mask[g].sum(1).max()) for g in grouped_steps])
    by_length = torch.argsort(step_len, stable=True)
    picked = [int(by_length[round(i * (steps - 1) / max(n_batches - 1, 1))]) for i in range(n_batches)]
    out = []
    for k in range(n_batches):
        rows = torch.cat([torch.arange(batch * k, batch * (k + 1)), batch * steps + torch.arange(batch * k, batch * (k + 1))])
        grouped = grouped_steps[picked[k]]
        trimmed = _trim(ids[rows], mask[rows])  # rows [0, B) safe, [B, 2B) unsafe, as torch.cat([safe, unsafe])
        padded = _pad_to(*trimmed, 77, tok.pad_token_id)
        out.append({"trimmed": trimmed, "pad77": padded, "grouped": _trim(ids[grouped], mask[grouped]), "lengths": mask[rows].sum(1)})
    return out, float(2 * batch * step_len.float().mean())


def make_recipe_step(model, optimizer, loss_fn, batches: list, kind: str, batch: int, dim: int, device, autocast_dtype,
                     max_grad_norm: float):
    """The trainer's step (finetune/train.py §3 loop) on precomputed anchors: forward of 2B captions under autocast, loss,
    the finite check (a sync), backward, clipping, Adam step. Every call takes the next of ``batches``."""
    gen = torch.Generator().manual_seed(1)
    anchors = [torch.nn.functional.normalize(torch.randn(batch, dim, generator=gen), dim=-1).to(device) for _ in range(3)]
    moved = [tuple(t.to(device) for t in b[kind]) for b in batches]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    calls = [0]

    def step():
        ids, mask = moved[calls[0] % len(moved)]
        calls[0] += 1
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = model(input_ids=ids, attention_mask=mask)["text"]
            loss = loss_fn(t=out[:batch], t_star=out[batch:], t0=anchors[0], t0_star=anchors[1], t0_hat=anchors[2])["loss"]
        if not torch.isfinite(loss.detach()).item():
            raise RuntimeError("non-finite loss in the benchmark step")
        loss.backward()
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = loss.item()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return value

    return step


def anchor_throughput(size: str, tok, batch: int, args, device, attention: str) -> float:
    """Captions per second of the one-off anchor encoding as the trainer runs it (``finetune.anchors.encode_text``: the
    frozen fp32 model, ``batch`` generated captions per forward, trimmed to the longest: over a whole data set the sorted
    batches are shorter, so this is an upper bound of the time)."""
    from finetune.anchors import encode_text

    clip = build_clip(size)
    clip.set_attn_implementation(attention)
    clip.to(device)
    where = next(clip.parameters()).device  # "cuda:0", not "cuda": encode_text would time a copy of the model otherwise
    caps = realistic_captions(batch, args.caption_tokens_mean, args.caption_tokens_sigma, seed=7)
    t = time_interleaved({"anchor_forward": lambda: encode_text(clip, tok, caps, batch_size=batch, device=where)},
                         warmup=1, repeats=args.repeats)["anchor_forward"]
    return batch / t.median


def target_search_s(pairs: int, dim: int, device, rows: int = 1024) -> float:
    """Seconds of the nearest-safe search over ``pairs`` unsafe x ``pairs`` safe anchors on ``device`` (the trainer searches
    on its training device), from ``rows`` unsafe rows timed once after a warm-up (the cost is linear in rows)."""
    import time

    from finetune.targets import nearest_safe

    gen = torch.Generator().manual_seed(2)
    pool = torch.nn.functional.normalize(torch.randn(pairs, dim, generator=gen), dim=-1).to(device)
    rows = min(rows, pairs)
    unsafe = torch.nn.functional.normalize(torch.randn(rows, dim, generator=gen), dim=-1)
    nearest_safe(unsafe[:8], pool, chunk_size=8)  # warm-up (kernels, allocator)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    nearest_safe(unsafe, pool, chunk_size=rows)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * pairs / rows


def padding_part(args, device, B: int) -> dict:
    """Trimmed (the trainer) vs padded-to-77 steps of the paper recipe's text tower, interleaved, plus the projection."""
    from finetune.modeling import SaferCLIP, weight_dtype_for
    from finetune.train import _build_loss
    from safer_diffusion.tiny import clip_tokenizer

    cfg = paper_recipe()
    cuda = device.type == "cuda"
    auto = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision) if cuda else None
    clip = build_clip(args.size)
    clip.set_attn_implementation(cfg.attention)
    model = SaferCLIP(clip, train_towers=cfg.train_towers, finetune=cfg.finetune, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                      lora_dropout=cfg.lora_dropout, lora_target_modules=cfg.lora_target_modules,
                      weight_dtype=weight_dtype_for(cfg.mixed_precision) if cuda else torch.float32).to(device)
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate,
                                 betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon, weight_decay=cfg.adam_weight_decay)
    loss_fn = _build_loss(cfg, None)
    tok = clip_tokenizer()
    dim = clip.config.projection_dim
    n_batches = args.warmup + args.repeats
    window = cfg.length_group_steps
    batches, grouped_window_tokens = _token_batches(tok, n_batches, B, args, seed=3, window=window)
    fns = {name: make_recipe_step(model, optimizer, loss_fn, batches, name, B, dim, device, auto, cfg.max_grad_norm)
           for name in ("trimmed", "pad77", "grouped")}
    RB = args.recipe_batch_size or cfg.train_batch_size
    if RB != B:  # the projection needs the step time at the recipe's batch size
        recipe_batches, _ = _token_batches(tok, n_batches, RB, args, seed=4, window=window)
        for kind in ("trimmed", "grouped"):
            fns[f"{kind}_recipe_batch"] = make_recipe_step(model, optimizer, loss_fn, recipe_batches, kind, RB, dim, device, auto,
                                                           cfg.max_grad_norm)  # fmt: skip
    timings = time_interleaved(fns, warmup=args.warmup, repeats=args.repeats)
    del model, optimizer, fns

    lengths = torch.cat([b["lengths"] for b in batches]).float()
    tokens = {k: statistics.mean(2 * B * b[k][0].shape[1] for b in batches) for k in ("trimmed", "pad77")}
    tokens["grouped"] = grouped_window_tokens  # over all the window's steps (the timed ones are spread over it)
    real = statistics.mean(int(b["lengths"].sum()) for b in batches)
    sps = {k: 1.0 / t.median for k, t in timings.items()}
    print(f"\npart padding: {args.size} text tower, paper recipe ({PAPER_CONFIG}: {cfg.finetune}"
          f"{f' r{cfg.lora_rank}' if cfg.finetune == 'lora' else ''}, {'autocast ' + str(auto).split('.')[-1] if auto else 'fp32'}, "
          f"{cfg.attention}), batch {B} pairs (= {2 * B} sequences), {device}")
    print(f"captions: {lengths.numel()} drawn, tokens mean {lengths.mean():.1f}, median {lengths.median():.0f}, max {lengths.max():.0f}; "
          f"real (non-pad) tokens/step {real:.0f}")
    print_table(timings, baseline="pad77")
    print(f"{'variant':<24}{'tokens/step':>12}{'steps/s':>10}")
    for k in ("trimmed", "pad77", "grouped"):
        print(f"{k:<24}{tokens[k]:12.0f}{sps[k]:10.3f}")
    speedup = sps["trimmed"] / sps["pad77"]
    grouped = sps["grouped"] / sps["pad77"]
    print(f"trimmed / pad77: {speedup:.2f}x steps/s (goal >= 2.5x at batch 256, vit-l14), {tokens['pad77'] / tokens['trimmed']:.2f}x fewer tokens")
    print(f"grouped / pad77: {grouped:.2f}x steps/s (--group_by_length, windows of {window} steps), "
          f"{tokens['pad77'] / tokens['grouped']:.2f}x fewer tokens")
    result = {
        "caption_tokens_mean": float(lengths.mean()), "caption_tokens_median": float(lengths.median()),
        "caption_tokens_max": int(lengths.max()), "real_tokens_per_step": real,
        "trimmed_tokens_per_step": tokens["trimmed"], "pad77_tokens_per_step": tokens["pad77"],
        "trimmed_steps_per_s": sps["trimmed"], "pad77_steps_per_s": sps["pad77"], "trim_speedup_over_pad77": speedup,
        "grouped_tokens_per_step": tokens["grouped"], "grouped_steps_per_s": sps["grouped"],
        "grouped_trim_speedup_over_pad77": grouped, "length_group_steps": window,
    }

    # ---- projection: steps x measured trimmed step time (at the recipe's batch) + anchors + nearest-safe search
    plan = recipe_steps(cfg, args.recipe_pairs)
    step_s = statistics.mean(timings["trimmed_recipe_batch" if RB != B else "trimmed"].times_s)
    grouped_step_s = statistics.mean(timings["grouped_recipe_batch" if RB != B else "grouped"].times_s)
    abatch = args.anchor_batch_size or cfg.anchor_batch_size
    anchor_caps_per_s = anchor_throughput(args.size, tok, abatch, args, device, cfg.attention)
    anchor_captions = 2 * plan["train_pairs"]  # safe + unsafe captions of the training split (distinct captions assumed)
    targets_s = target_search_s(plan["train_pairs"], dim, device)
    train_s, anchors_s = plan["steps"] * step_s, anchor_captions / anchor_caps_per_s
    total_min = (train_s + anchors_s + targets_s) / 60
    grouped_train_s = plan["steps"] * grouped_step_s
    grouped_min = (grouped_train_s + anchors_s + targets_s) / 60
    print(f"\nprojection: paper recipe on {plan['pairs']} pairs ({plan['train_pairs']} trained, val_fraction {cfg.val_fraction}), "
          f"{cfg.num_train_epochs} epochs, batch {cfg.train_batch_size}, curriculum {cfg.curriculum} {plan['stage_sizes']}")
    print(f"  steps {plan['steps']} (epoch plan {plan['steps_per_epoch']}; {plan['pairs']} x {cfg.num_train_epochs} / "
          f"{cfg.train_batch_size} would be {plan['steps_naive']})")
    print(f"  train    {plan['steps']} steps x {step_s:.4f} s (mean trimmed step at batch {RB})  = {train_s / 60:8.2f} min")
    print(f"  anchors  {anchor_captions} captions / {anchor_caps_per_s:.0f} captions/s (fp32, one batch of {abatch} trimmed to its longest) = "
          f"{anchors_s / 60:8.2f} min")
    print(f"  targets  nearest-safe search {plan['train_pairs']} x {plan['train_pairs']} on {device}            = {targets_s / 60:8.2f} min")
    print(f"  total    {total_min:.2f} min (goal <= 3 on one H100/H200; excludes model loading, checkpoint writes, end metrics)")
    print(f"  with --group_by_length: train {plan['steps']} x {grouped_step_s:.4f} s = {grouped_train_s / 60:.2f} min, "
          f"total {grouped_min:.2f} min")
    result.update({
        "recipe_batch_size": cfg.train_batch_size, "projection_step_batch": RB, "recipe_steps": plan["steps"],
        "recipe_steps_naive": plan["steps_naive"], "recipe_train_pairs": plan["train_pairs"],
        "recipe_step_s": step_s, "anchor_captions_per_s": anchor_caps_per_s, "anchor_batch_size": abatch,
        "projected_train_min": train_s / 60, "projected_anchors_min": anchors_s / 60, "projected_targets_min": targets_s / 60,
        "projected_paper_recipe_min": total_min, "recipe_grouped_step_s": grouped_step_s,
        "projected_grouped_train_min": grouped_train_s / 60, "projected_paper_recipe_grouped_min": grouped_min,
        "recipe": {"config": PAPER_CONFIG, "finetune": cfg.finetune, "lora_rank": cfg.lora_rank, "mixed_precision": cfg.mixed_precision,
                   "attention": cfg.attention, "curriculum": cfg.curriculum, "epochs": cfg.num_train_epochs,
                   "steps_per_epoch": plan["steps_per_epoch"], "caption_tokens_sigma": args.caption_tokens_sigma},
    })
    return result


def peak_tflops(override: float | None) -> float | None:
    if override:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


@dataclass
class TrainBenchConfig:
    size: str = option("tiny", "Text-tower size.", choices=tuple(SIZES))
    device: str = device_option()
    batch_size: int | None = option(None, "Pairs per step (default: 64 tiny, 256 vit-l14).", bounds=(1, None))
    finetune: str = option("lora", "Part 1 trainable weights.", choices=("lora", "full"))
    repeats: int = option(10, "Timed steps per variant.", bounds=(1, None))
    warmup: int = option(2, "Untimed steps per variant.", bounds=(0, None))
    peak_tflops: float | None = option(None, "Peak dense bf16 TFLOP/s for MFU (default: a table by GPU name).", bounds=(0.0, None))
    threads: int | None = option(None, "torch CPU threads (default: torch's; 1 avoids stalls on a loaded machine).", bounds=(1, None))
    caption_tokens_mean: float = option(20.0, "Part padding: mean CLIP token count of the generated captions.", bounds=(4.0, 77.0))
    caption_tokens_sigma: float = option(0.25, "Part padding: log-normal shape of the caption lengths (about their coefficient "
                                         "of variation; 0.25 ~ COCO captions).", bounds=(0.0, 2.0))
    recipe_pairs: int = option(PAPER_PAIRS, "Projection: pairs loaded (the trainer holds out the recipe's val_fraction).",
                               bounds=(2, None))
    recipe_batch_size: int | None = option(None, "Projection: batch of the timed recipe step (default: the paper config's, 48).",
                                           bounds=(1, None))
    anchor_batch_size: int | None = option(None, "Projection: anchor-encoding batch timed (default: the paper config's, 256).",
                                           bounds=(1, None))

    def validate(self) -> None:
        resolve_device_and_dtype(self.device, "auto")


def run(args: TrainBenchConfig) -> dict:
    """Part 1 everywhere, part 2 on CUDA; print the tables and the JSON line; return the result."""
    device = torch.device(resolve_device_and_dtype(args.device, "auto")[0])
    if args.threads:
        torch.set_num_threads(args.threads)
    B = args.batch_size or SIZES[args.size]["batch"]
    result: dict = {"benchmark": "bench_train", "size": args.size, "batch_size": B, "device": str(device), "env": environment()}

    # ---- part 1: precomputed anchors vs live reference
    auto = torch.bfloat16 if device.type == "cuda" else None
    wdt = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, opt, loss_fn, batch, anchors = prepare(args.size, args.finetune, B, device, "sdpa", wdt, live=True)
    fns = {
        "anchors": make_step(model, opt, loss_fn, batch, anchors, device, auto),
        "live_reference": make_step(model, opt, loss_fn, batch, None, device, auto),
    }
    if device.type == "cuda":  # with mixed precision, Safe-CLIP's separate fp32 reference costs more than our bf16 one
        fp32_copy = build_clip(args.size).to(device)
        fns["fp32_reference_copy"] = make_copy_step(model, opt, loss_fn, batch, fp32_copy, device, auto)
    timings = time_interleaved(fns, warmup=args.warmup, repeats=args.repeats)
    print(f"\npart 1: {args.size} text tower, {args.finetune}, batch {B} pairs, {device}")
    print_table(timings, baseline="live_reference")
    sps = {k: 1.0 / t.median for k, t in timings.items()}
    result.update({
        "anchors_steps_per_s": sps["anchors"], "live_reference_steps_per_s": sps["live_reference"],
        "anchors_speedup_over_live": sps["anchors"] / sps["live_reference"],
    })
    if "fp32_reference_copy" in sps:
        result["anchors_speedup_over_fp32_reference_copy"] = sps["anchors"] / sps["fp32_reference_copy"]
    del model, opt, fns

    # ---- part padding: trimmed to the longest caption (the trainer) vs padded to 77, and the paper-recipe projection
    result.update(padding_part(args, device, B))

    # ---- part 2: precision / attention backends (CUDA)
    if device.type == "cuda":
        modes = {"fp32_eager": (torch.float32, None, "eager"), "bf16_sdpa": (torch.bfloat16, torch.bfloat16, "sdpa")}
        try:
            import xformers.ops  # noqa: F401

            modes["bf16_xformers"] = (torch.bfloat16, torch.bfloat16, "xformers")
        except ImportError:
            result["xformers"] = "not installed"
        peak = peak_tflops(args.peak_tflops)
        part2 = {}
        for name, (wdt, auto, attention) in modes.items():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            model, opt, loss_fn, batch, anchors = prepare(args.size, "full", B, device, attention, wdt, live=False, pad_to_max=True)
            t = time_interleaved({name: make_step(model, opt, loss_fn, batch, anchors, device, auto)}, warmup=args.warmup,
                                 repeats=args.repeats)[name]
            flops = step_flops(args.size, "full", 2 * B, model)
            part2[name] = {"step_s": t.median, "samples_per_s": 2 * B / t.median, "tflops": flops / t.median / 1e12,
                           "mfu": (flops / t.median / 1e12 / peak) if peak else None,
                           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}
            del model, opt
        print(f"\npart 2: {args.size} text tower, full fine-tuning, batch {B} pairs (= {2 * B} sequences x 77 tokens)")
        print(f"{'mode':<16}{'step s':>10}{'seq/s':>10}{'TFLOP/s':>10}{'MFU':>8}{'mem GiB':>9}")
        for name, r in part2.items():
            mfu = f"{100 * r['mfu']:7.1f}%" if r["mfu"] is not None else "     n/a"
            print(f"{name:<16}{r['step_s']:10.4f}{r['samples_per_s']:10.1f}{r['tflops']:10.1f}{mfu}{r['peak_mem_gib']:9.2f}")
        result["precision"] = part2
        result["peak_bf16_tflops"] = peak
        base = part2["fp32_eager"]["step_s"]
        for name in part2:
            result[f"mfu_{name}"] = part2[name]["mfu"]
            if name != "fp32_eager":
                result[f"{name}_speedup_over_fp32_eager"] = base / part2[name]["step_s"]
    dump_json_line(result)
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.bench_train``: 0 success, 2 bad input, 1 failure."""
    return benchmark_main(TrainBenchConfig, run, argv, prog=PROG, doc=__doc__)


if __name__ == "__main__":
    raise SystemExit(main())
