"""Training-step throughput: precomputed anchors vs a live frozen reference; precision/attention backends; MFU.

    python -m benchmarks.bench_train                                  # CPU, tiny CLIP: anchors vs live reference
    python -m benchmarks.bench_train --size vit-l14 --device cuda     # + fp32 eager vs bf16 SDPA vs bf16 xformers, batch 256

Part 1 (every device): one SaFeR-CLIP training step of the text tower (LoRA r16, Adam) on a batch of
B safe + B unsafe captions, timed interleaved in two variants on the same model:
``anchors`` takes T0(t), T0(t*), T0(t̂) from precomputed tensors (this project's default);
``live_reference`` runs the frozen reference forward on 3B captions every step with the adapters
disabled (the Safe-CLIP way of getting T0, at our precision); on CUDA also ``fp32_reference_copy``,
Safe-CLIP's public script: a separate fp32 CLIP copy run every step. Goal: anchors >= 2x steps/s.
Bound: with LoRA the backward costs about one forward (no weight gradients for frozen weights), so
anchors save at most (2F + 1.5F) / 2F = 1.75x against a same-precision live reference on 3B
captions; the 2x goal is reachable only against the fp32 copy.

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

import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/bench_train.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.timing import benchmark_main, dump_json_line, environment, print_table, time_interleaved  # noqa: E402
from safer_diffusion.options import device_option, option, resolve_device_and_dtype  # noqa: E402

PROG = "python -m benchmarks.bench_train"

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

    def validate(self) -> None:
        resolve_device_and_dtype(self.device, "auto")


def run(args: TrainBenchConfig) -> dict:
    """Part 1 everywhere, part 2 on CUDA; print the tables and the JSON line; return the result."""
    device = torch.device(resolve_device_and_dtype(args.device, "auto")[0])
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
