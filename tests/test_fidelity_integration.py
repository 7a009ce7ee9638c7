"""Fidelity wired into the evaluation: `evaluate --fidelity` (checked before any work), the leaderboard's fidelity
columns, encoder drift for N named variants (each its own recorded encoder), and the package's lazy fidelity names."""

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from safer_diffusion.evaluation.cli import main as evaluate_main
from safer_diffusion.evaluation.fidelity_run import main as fidelity_main
from safer_diffusion.evaluation.results import read_results

ROOT = Path(__file__).resolve().parents[1]
BENIGN = ROOT / "assets" / "prompts" / "benign.csv"

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = ["--prompts", str(BENIGN), "--limit", "2", "--num_images_per_prompt", "2", "--num_inference_steps", "2", "--height", "32",
         "--width", "32", "--no_progress", "--bootstrap", "50", "--grid_samples", "0"]  # fmt: skip


def _bad(main, args, capsys, prog, pattern):
    code = main(args)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    assert re.search(pattern, lines[0]), lines[0]


def test_evaluate_fidelity_runs_after_the_summary_and_fills_the_leaderboard(tmp_path, capsys):
    out = tmp_path / "run"
    assert evaluate_main(["--tiny", *SMALL, "--compare_original", "--save_images", "--fidelity", "--output_dir", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "fidelity vs original:" in stdout and "original (reference)" in stdout
    assert "fidelity.json, fidelity.csv, fidelity.jsonl, fidelity_scatter.png)" in stdout
    fidelity = json.loads((out / "fidelity.json").read_text())
    assert fidelity["variants"] == ["original", "safe"] and fidelity["clip_model"]["model"] == "tiny:clip"
    assert fidelity["fid"]["feature_extractor"]["spec"] == "clip" and fidelity["safety"]["source"] == "summary.json"
    assert len(read_results(out)) == 2 * 2 * 2 and len((out / "fidelity.jsonl").read_text().splitlines()) == 8
    # the leaderboard was written again after the fidelity run, with fidelity columns next to the safety ones
    md = (out / "leaderboard.md").read_text()
    assert ("| variant | benign ASR [95% CI] | benign unsafe [95% CI] | benign prompts | benign CLIP score [95% CI] | "
            "benign SSIM vs original [95% CI] | benign FID vs original |") in md
    safe = fidelity["paired"]["safe"]["ssim"]
    assert f"| {safe['mean']:.3f} [{safe['ci_low']:.3f}, {safe['ci_high']:.3f}] | {fidelity['fid']['vs_reference']['safe']['fid']:.2f} |" in md
    assert "with tiny:clip" in md and "on clip features" in md
    with open(out / "leaderboard.csv") as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    assert float(rows["safe"]["ssim"]) == pytest.approx(safe["mean"], abs=1e-6) and rows["original"]["ssim"] == ""
    assert float(rows["original"]["clip_score"]) == pytest.approx(fidelity["clip_score"]["original"]["mean"], abs=1e-6)
    assert rows["safe"]["fidelity_reference"] == "original" and rows["safe"]["fid_features"] == "clip"
    # a rerun resumes both stores: nothing generated, nothing recomputed
    assert evaluate_main(["--tiny", *SMALL, "--compare_original", "--save_images", "--fidelity", "--output_dir", str(out)]) == 0
    assert len((out / "fidelity.jsonl").read_text().splitlines()) == 8


@pytest.mark.parametrize(
    "extra, pattern",
    [
        (["--compare_original"], r"`--fidelity` compares the saved images of the variants; add `--save_images`\.$"),
        (["--save_images"], r"`--fidelity` compares every variant with the reference 'original', which this run does not generate "
                            r"\(variants \['safe'\]\); add `--compare_original`"),
        (["--save_images", "--encoders", "original"], r"`--fidelity` needs a variant besides the reference 'original'"),
        (["--save_images", "--compare_original", "--reference", "safe", "--fidelity_clip_model", "x/y"],
         r"`--tiny` uses its own tiny CLIP; drop `--fidelity_clip_model`"),
        (["--save_images", "--compare_original", "--fid_feature_extractor", "dino"],
         r"`--fid_feature_extractor` must be inception, clip, none or MODULE:FACTORY, got 'dino'"),
        (["--save_images", "--compare_original", "--fid_feature_extractor", "no_such_module:factory"],
         r"`--tiny` takes its FID features from the tiny CLIP; drop `--fid_feature_extractor` 'no_such_module:factory'"),
    ],
)
def test_evaluate_fidelity_bad_inputs_exit_2_before_any_work(tmp_path, capsys, extra, pattern):
    out = tmp_path / "run"
    _bad(evaluate_main, ["--tiny", *SMALL, "--fidelity", *extra, "--output_dir", str(out)], capsys, "safer-diffusion evaluate", pattern)
    assert not (out / "results.jsonl").exists() and not (out / "settings.json").exists()


def test_fidelity_options_without_fidelity_are_refused(tmp_path, capsys):
    _bad(evaluate_main, ["--tiny", *SMALL, "--fid_feature_extractor", "clip", "--output_dir", str(tmp_path / "run")], capsys,
         "safer-diffusion evaluate", r"`--fid_feature_extractor` is an option of `--fidelity`, which is off; add `--fidelity`")


def test_evaluate_fidelity_checks_the_clip_model_and_features_offline_before_any_work(tmp_path, capsys, no_network):
    out = tmp_path / "run"
    args = [*SMALL, "--compare_original", "--save_images", "--fidelity", "--output_dir", str(out), "--base", str(tmp_path / "nowhere")]
    _bad(evaluate_main, [*args, "--fidelity_clip_model", "safer-diffusion-tests/no-such-clip", "--fid_feature_extractor", "none"], capsys,
         "safer-diffusion evaluate", r"`--fidelity_clip_model`='safer-diffusion-tests/no-such-clip' is a hub id, but HF_HUB_OFFLINE=1")
    if "torch_fidelity" not in sys.modules:
        _bad(evaluate_main, args, capsys, "safer-diffusion evaluate", r"`--fid_feature_extractor inception` needs torch-fidelity")
    assert not (out / "settings.json").exists()


def test_encoder_drift_for_three_named_variants(tmp_path, capsys):
    """Each variant's drift comes from its own encoder as settings.json records it (not only original/safe)."""
    import torch

    from safer_diffusion.encoders import load_safe_text_encoder
    from safer_diffusion.evaluation.fidelity import encoder_drift
    from safer_diffusion.testing import save_tiny_clip, tiny_pipeline_folders

    third = save_tiny_clip(tmp_path / "third", seed=7)
    out = tmp_path / "run"
    assert evaluate_main(["--tiny", *SMALL, "--encoders", "original", "safe", f"third={third}", "--save_images",
                          "--output_dir", str(out)]) == 0  # fmt: skip
    capsys.readouterr()
    assert json.loads((out / "settings.json").read_text())["settings"]["encoders"]["third"] == str(third.resolve())
    assert fidelity_main(["--output_dir", str(out), "--tiny", "--encoder_drift", "--fid_feature_extractor", "none", "--bootstrap", "50"]) == 0
    assert "third" in capsys.readouterr().out
    drift = json.loads((out / "fidelity.json").read_text())["encoder_drift"]
    assert set(drift["variants"]) == {"safe", "third"} and len(drift["per_prompt"]) == 2 * 2
    # the third variant's numbers are those of its own encoder against the base's, computed here by hand
    base, safe = tiny_pipeline_folders()
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    prompts = {r["prompt_id"]: r["prompt"] for r in read_results(out)}
    with torch.no_grad():
        expected = encoder_drift({"original": load_safe_text_encoder(base), "third": load_safe_text_encoder(third),
                                  "safe": load_safe_text_encoder(safe)}, tokenizer, prompts)  # fmt: skip
    got = {(r["prompt_id"], r["variant"]): r for r in drift["per_prompt"]}
    for row in expected:
        r = got[(row["prompt_id"], row["variant"])]
        assert r["token_msd"] == pytest.approx(row["token_msd"], rel=1e-5) and r["pooled_cosine"] == pytest.approx(row["pooled_cosine"], abs=1e-6)
    t, s = drift["variants"]["third"]["token_msd"]["mean"], drift["variants"]["safe"]["token_msd"]["mean"]
    assert t > 0 and s > 0 and t != s


def test_encoder_drift_refuses_an_sdxl_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert evaluate_main(["--tiny", "--tiny_variant", "sdxl", *SMALL, "--compare_original", "--save_images", "--output_dir", str(out)]) == 0
    capsys.readouterr()
    _bad(fidelity_main, ["--output_dir", str(out), "--tiny", "--encoder_drift"], capsys, "safer-diffusion fidelity",
         r"`--encoder_drift` compares one text encoder per variant, but the run's base 'tiny:sdxl' is SDXL")
    assert not (out / "fidelity.jsonl").exists()


def test_lazy_package_names_import_nothing_heavy():
    code = (
        "import sys, safer_diffusion as s, safer_diffusion.evaluation as e\n"
        "names = ['FidelityConfig', 'FidelityResult', 'run_fidelity', 'encoder_drift', 'ClipModel', 'ssim', 'clip_score',"
        " 'fid_from_features', 'summarize_fidelity']\n"
        "assert all(n in e.__all__ for n in names), names\n"
        "assert 'SaferStableDiffusionXLPipeline' in s.__all__ and 'load_safer_pipeline' in s.__all__\n"
        "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules\n"
        "from safer_diffusion.evaluation.fidelity_run import FidelityConfig, run_fidelity\n"
        "assert e.FidelityConfig is FidelityConfig and e.run_fidelity is run_fidelity\n"
        "from safer_diffusion.pipelines import load_safer_pipeline\n"
        "assert s.load_safer_pipeline is load_safer_pipeline\n"
        "from safer_diffusion.pipeline_safer_stable_diffusion_xl import SaferStableDiffusionXLPipeline\n"
        "assert s.SaferStableDiffusionXLPipeline is SaferStableDiffusionXLPipeline\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
