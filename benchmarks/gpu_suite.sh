#!/usr/bin/env bash
# ONE command that runs every benchmark at real size on a single H100/H200-class GPU (about 11 min)
# and writes results.json and results.md into the folder given as its argument (rewritten after every part, so a run
# cut short by a time limit still leaves the table of the parts it finished).
#
#   bash benchmarks/gpu_suite.sh OUTDIR
#
# The GPU machine needs torch (CUDA), transformers, accelerate, safetensors, numpy, pillow, peft,
# psutil; diffusers and open_clip_torch (and optionally xformers) can be brought as wheels:
# run `bash benchmarks/fetch_gpu_wheels.sh` where a package registry is reachable, copy .whl/
# beside the repository, and this script installs them offline (`pip install --no-index`).
# Environment: SUITE_SKIP="train targets" skips parts; SUITE_QUICK=1 uses fewer repeats;
# SUITE_DRY_RUN=1 runs the same script on the CPU at tiny sizes (checks the plumbing, no GPU figures).
set -uo pipefail
OUT=${1:?usage: bash benchmarks/gpu_suite.sh OUTDIR}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export SAFER_DIFFUSION_CACHE=${SAFER_DIFFUSION_CACHE:-/tmp/safer_diffusion_cache}
PY=${PYTHON:-python3}

if compgen -G ".whl/*.whl" >/dev/null; then
  echo "== installing carried wheels from .whl/"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

echo "== environment check"
$PY - <<'PYEOF' | tee "$OUT/environment.txt"
import importlib, sys
need = ["torch", "transformers", "accelerate", "safetensors", "numpy", "PIL", "diffusers", "peft", "psutil"]
optional = ["open_clip", "xformers"]
missing = []
for name in need + optional:
    try:
        mod = importlib.import_module(name)
        print(f"  ok       {name:<13} {getattr(mod, '__version__', '')}")
    except Exception as e:
        print(f"  {'MISSING' if name in need else 'absent':<8} {name:<13} ({type(e).__name__}: {e})")
        if name in need:
            missing.append(name)
import torch
print(f"  cuda     {torch.cuda.is_available()} {torch.cuda.get_device_name(0) if torch.cuda.is_available() else ''}")
import os
if missing or not (torch.cuda.is_available() or os.environ.get("SUITE_DRY_RUN")):
    print(f"missing required: {missing or ['a CUDA GPU']}; bring wheels with benchmarks/fetch_gpu_wheels.sh", file=sys.stderr)
    sys.exit(2)
PYEOF
[[ ${PIPESTATUS[0]} -eq 0 ]] || exit 2

REPEATS=${SUITE_QUICK:+2}
REPEATS=${REPEATS:-3}
skip() { [[ " ${SUITE_SKIP:-} " == *" $1 "* ]]; }
run() {  # name, timeout seconds, command...
  local name=$1 limit=$2; shift 2
  echo "== $name: $*"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  tail -n 1 "$OUT/$name.log" > "$OUT/$name.json.tmp"
  if [[ $rc -eq 0 ]] && $PY -c "import json,sys; json.load(open(sys.argv[1]))" "$OUT/$name.json.tmp" 2>/dev/null; then
    mv "$OUT/$name.json.tmp" "$OUT/$name.json"
  else
    echo "{\"error\": \"$name exited with $rc\"}" > "$OUT/$name.json"; rm -f "$OUT/$name.json.tmp"
  fi
  summarize > /dev/null
}

if [[ -n ${SUITE_DRY_RUN:-} ]]; then
  PIPELINE_ARGS=(--size tiny --device cpu --repeats 3); TARGETS_ARGS=(--n 4000 --dim 768 --device cpu --repeats 1)
  PIPELINE_SDXL_ARGS=(--size sdxl-tiny --device cpu --repeats 3 --threads 1)
  COMPARE_ARGS=(--size tiny --device cpu --repeats 3 --threads 1)  # 21 tiny generations a repeat: one thread, no stalls
  TRAIN_ARGS=(--size tiny --device cpu --repeats 3 --threads 1); EVAL_ARGS=(--tiny --device cpu --repeats 1)
else
  PIPELINE_ARGS=(--size sd15 --device cuda --dtype float16 --num_inference_steps 25 --height 512 --width 512 --repeats "$REPEATS")
  PIPELINE_SDXL_ARGS=(--size sdxl --device cuda --dtype float16 --num_inference_steps 25 --height 1024 --width 1024 --repeats "$REPEATS")
  COMPARE_ARGS=(--size sd15 --device cuda --dtype float16 --num_inference_steps 25 --height 512 --width 512 --n_encoders 2 3 5 --repeats "$REPEATS")
  TARGETS_ARGS=(--n 200000 --dim 768 --device cuda)
  TRAIN_ARGS=(--size vit-l14 --device cuda --batch_size 256 --repeats "$REPEATS")
  EVAL_ARGS=(--size sd15 --device cuda --dtype float16 --num_inference_steps 25 --batch_size 1)
fi
# results.json / results.md from the parts finished so far: rewritten after every part, so a run cut short (a
# device call's time limit) still leaves its table.
summarize() {
$PY - "$OUT" <<'PYEOF'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
from benchmarks.timing import environment
res = {"environment": environment(), "results": {}}
for name in ("pipeline", "pipeline_sdxl", "compare", "targets", "train", "eval"):
    p = out / f"{name}.json"
    if p.exists():
        res["results"][name] = json.loads(p.read_text())
tests_log = out / "gpu_tests.log"
if tests_log.exists():
    lines_ = [ln for ln in tests_log.read_text().splitlines() if ln.strip()]
    res["gpu_tests"] = lines_[-1] if lines_ else "no output"
(out / "results.json").write_text(json.dumps(res, indent=2))
goals = {
    "safe_over_vanilla": ("<=", 1.01), "compare_over_single": ("<=", 1.3), "compare_peak_mem_over_single": ("<=", 1.15),
    "compare_n3_per_encoder": ("<=", 0.6), "compare_n5_per_encoder": ("<=", 0.6),
    "bf16_sdpa_speedup_over_fp32_eager": (">=", 3.0), "bf16_xformers_speedup_over_fp32_eager": (">=", 3.0),
    "mfu_bf16_sdpa": (">=", 0.35), "mfu_bf16_xformers": (">=", 0.35),
    "anchors_speedup_over_live": (">=", 2.0), "anchors_speedup_over_fp32_reference_copy": (">=", 2.0),
    "full_200k_s": ("<=", 2.0), "evaluate_over_generate_ratio": ("<=", 1.05),
    "trim_speedup_over_pad77": (">=", 2.5), "projected_paper_recipe_min": ("<=", 3.0),
    "grouped_trim_speedup_over_pad77": (">=", 2.5), "projected_paper_recipe_grouped_min": ("<=", 3.0),
    # BENCHMARK.METRIC: a goal for one benchmark's metric (before METRIC's). SDXL at 1024 px fills the GPU, so compare()
    # (original + safe pairs, 2x the UNet rows) is held to at most two separate generations, not SD 1.5's 1.3.
    "pipeline_sdxl.safe_over_vanilla": ("<=", 1.01), "pipeline_sdxl.compare_over_single": ("<=", 2.0),
}
lines = [f"# GPU suite results ({res['environment'].get('date')}, {res['environment'].get('device')})", "",
         "| benchmark | metric | value | goal | met |", "|---|---|---|---|---|"]
for name, r in res["results"].items():
    for k, v in r.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            g = goals.get(f"{name}.{k}", goals.get(k))
            met = "" if g is None else ("yes" if (v <= g[1] if g[0] == "<=" else v >= g[1]) else "NO")
            lines.append(f"| {name} | {k} | {v:.4g} | {'' if g is None else g[0] + ' ' + str(g[1])} | {met} |")
if "gpu_tests" in res:
    lines += ["", f"GPU tests (`pytest --rungpu -m gpu`): {res['gpu_tests']}"]
lines += ["", "Environment: `" + json.dumps(res["environment"]) + "`"]
(out / "results.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PYEOF
}

if ! skip tests && [[ -z ${SUITE_DRY_RUN:-} ]]; then
  echo "== GPU tests: pytest --rungpu -m gpu"
  timeout 240 $PY -m pytest -q -p no:cacheprovider --rungpu -m gpu tests/test_pipeline.py tests/test_compare.py tests/test_train.py 2>&1 | tee "$OUT/gpu_tests.log"
fi
skip pipeline || run pipeline 200 $PY -m benchmarks.bench_pipeline "${PIPELINE_ARGS[@]}"
skip pipeline_sdxl || run pipeline_sdxl 400 $PY -m benchmarks.bench_pipeline "${PIPELINE_SDXL_ARGS[@]}"
skip compare  || run compare 300  $PY -m benchmarks.bench_compare "${COMPARE_ARGS[@]}"
skip targets  || run targets 60   $PY -m benchmarks.bench_targets "${TARGETS_ARGS[@]}"
# train: anchors vs live reference, trimmed vs padded-to-77 batches (paper recipe, LoRA), the projected wall time of the
# text-only paper recipe (projected_paper_recipe_min), precision / attention backends
skip train    || run train 300    $PY -m benchmarks.bench_train "${TRAIN_ARGS[@]}"
skip eval     || run eval 150     $PY -m benchmarks.bench_eval "${EVAL_ARGS[@]}"
echo "== $OUT/results.json and $OUT/results.md"
summarize
