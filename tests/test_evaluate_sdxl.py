"""`safer-diffusion evaluate` with an SDXL base: the tiny SDXL (`--tiny --tiny_variant sdxl`) and a local SDXL folder run
to a summary through the SDXL pipeline class, compare() equals the one-variant runs, and SDXL-specific inputs are
checked before any model loads (the default ViT-L-only encoder, N variants, `--safe_encoder_2` with an SD base)."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from safer_diffusion.evaluation.cli import main
from safer_diffusion.evaluation.results import read_results

ROOT = Path(__file__).resolve().parents[1]
MILD = ROOT / "assets" / "prompts" / "mild_unsafe.csv"

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = ["--prompts", str(MILD), "--limit", "2", "--num_images_per_prompt", "2", "--num_inference_steps", "2", "--height", "32",
         "--width", "32", "--no_progress", "--bootstrap", "50", "--grid_samples", "2", "--save_images"]  # fmt: skip


def _images(out, variant):
    return {(r["prompt_id"], r["seed"]): np.asarray(Image.open(out / r["image"]), dtype=np.int16)
            for r in read_results(out) if r["variant"] == variant}  # fmt: skip


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("sdxl") / "compare"
    assert main(["--tiny", "--tiny_variant", "sdxl", *SMALL, "--compare_original", "--output_dir", str(out)]) == 0
    return out


def test_tiny_sdxl_compare_runs_to_a_summary(compared, capsys):
    summary = json.loads((compared / "summary.json").read_text())
    assert summary["variants"] == ["original", "safe"] and summary["reference"] == "original"
    assert len(read_results(compared)) == 2 * 2 * 2
    stored = json.loads((compared / "settings.json").read_text())
    assert stored["settings"]["base"] == "tiny:sdxl" and stored["settings"]["encoders"] == {"original": "base", "safe": "tiny:sdxl"}
    assert stored["protocol"]["models"]["pipeline"] == "SaferStableDiffusionXLPipeline"
    assert (compared / "grid.png").is_file() and (compared / "leaderboard.md").is_file()
    a, b = _images(compared, "original"), _images(compared, "safe")
    assert set(a) == set(b) and all(img.shape == (32, 32, 3) for img in a.values())
    assert any((a[k] != b[k]).any() for k in a)  # the safe pair conditions the safe images


@pytest.mark.parametrize("variant", ["safe", "original"])
def test_one_variant_runs_equal_the_compare_pass(compared, tmp_path, variant):
    """Each SDXL variant alone (its own pipeline call, same latents and seeds) gives the images of the one-pass compare()."""
    out = tmp_path / variant
    assert main(["--tiny", "--tiny_variant", "sdxl", *SMALL, "--encoders", variant, "--output_dir", str(out)]) == 0
    alone, together = _images(out, variant), _images(compared, variant)
    assert set(alone) == set(together)
    for k in alone:
        assert np.abs(alone[k] - together[k]).max() <= 1, k  # float tolerance, then 8-bit rounding


def test_a_local_sdxl_base_folder_with_a_two_encoder_export(tmp_path, capsys):
    from safer_diffusion.testing import tiny_pipeline_folders

    base, export = tiny_pipeline_folders(variant="sdxl")
    out = tmp_path / "run"
    assert main(["--base", str(base), "--safe_encoder", str(export), *SMALL, "--limit", "1", "--output_dir", str(out)]) == 0
    assert "results: " in capsys.readouterr().out
    stored = json.loads((out / "settings.json").read_text())
    assert stored["settings"]["base"] == str(base) and "safe_encoder_2" not in stored["settings"]
    assert {r["variant"] for r in read_results(out)} == {"safe"}


def test_tiny_sd2_variant_runs(tmp_path):
    out = tmp_path / "sd2"
    assert main(["--tiny", "--tiny_variant", "sd2", *SMALL, "--limit", "1", "--compare_original", "--output_dir", str(out)]) == 0
    assert json.loads((out / "settings.json").read_text())["settings"]["base"] == "tiny:sd2"


def test_sdxl_bad_inputs_exit_2_before_any_model_loads(tmp_path, capsys, monkeypatch):
    from safer_diffusion.testing import save_tiny_clip, tiny_pipeline_folders

    sd_base, sd_clip = tiny_pipeline_folders()
    xl_base, export = tiny_pipeline_folders(variant="sdxl")
    third = save_tiny_clip(tmp_path / "third", seed=7)
    capsys.readouterr()  # the bars of building the tiny models

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr("safer_diffusion.evaluation.generate.load_safer_pipeline", no_loading)
    monkeypatch.setattr("safer_diffusion.evaluation.run.build_scorers", no_loading)
    cases = [
        (["--tiny", "--tiny_variant", "sdxl", "--encoders", "original", "safe", f"third={third}"],
         r"`--encoders` \['third'\]: with an SDXL `--base` only original and safe can be generated .*the evaluation does not "
         r"load NAME=SOURCE pairs yet"),
        (["--base", str(xl_base), "--compare_original"],
         r"`--base` .* is SDXL, which conditions on two text encoders \(CLIP ViT-L/14 and OpenCLIP ViT-bigG/14\), but the default "
         r"`--safe_encoder` Adeely93/SafeR_CLIP is a ViT-L/14 only and would leave the bigG path unsafe\. Pass a two-encoder export "
         r"folder .*docs/EXPORT_FORMAT\.md section 8.* as `--safe_encoder DIR`, or the ViT-L/14 as `--safe_encoder` and the bigG as "
         r"`--safe_encoder_2`\.$"),
        (["--base", str(xl_base), "--safe_encoder", str(sd_clip)],
         r"`--safe_encoder`=.* is one text encoder, but an SDXL base conditions on two: .*The safe text_encoder_2 is missing"),
        (["--base", str(sd_base), "--safe_encoder", str(sd_clip), "--safe_encoder_2", str(export)],
         r"`--safe_encoder_2` is for SDXL bases \(two text encoders\), but `--base` .* is a Stable Diffusion 1\.x/2\.x pipeline with "
         r"one; drop `--safe_encoder_2`\.$"),
        (["--tiny_variant", "sdxl"], r"`--tiny_variant` sdxl picks the tiny models of `--tiny`; add `--tiny`, or drop `--tiny_variant`\.$"),
        (["--tiny", "--safe_encoder_2", str(export)], r"`--tiny` builds its own tiny models; drop `--base`/`--safe_encoder`/`--safe_encoder_2`"),
        (["--base", str(xl_base), "--safe_encoder_2", str(export), "--encoders", "original"],
         r"`--safe_encoder_2` is set but no variant uses the safe encoder \(variants \['original'\]\)"),
    ]
    for i, (extra, pattern) in enumerate(cases):
        out = tmp_path / f"out{i}"
        assert main([*extra, *SMALL, "--output_dir", str(out)]) == 2, extra
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("safer-diffusion evaluate: error: "), err
        assert re.search(pattern, lines[0]), lines[0]
        assert not (out / "settings.json").exists()
