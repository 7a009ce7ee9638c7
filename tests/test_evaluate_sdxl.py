"""`safer-diffusion evaluate` with an SDXL base: the tiny SDXL (`--tiny --tiny_variant sdxl`) and a local SDXL folder run
to a summary through the SDXL pipeline class, compare() equals the one-variant runs, N variants (each a pair of text
encoders) share one denoising loop and resume, and SDXL-specific inputs are checked before any model loads (the default
ViT-L-only encoder, a single-encoder export for a variant, swapped towers, a pair for an SD base, `--safe_encoder_2` with
an SD base)."""

import json
import re
import shutil
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


@pytest.fixture(scope="module")
def other_pair(tmp_path_factory):
    """A third tiny SDXL pair (two-encoder export) that fits the tiny SDXL base, with other weights than the safe one."""
    from safer_diffusion.testing import save_tiny_sdxl_export

    return save_tiny_sdxl_export(tmp_path_factory.mktemp("pairs") / "other", seed=7)


@pytest.fixture(scope="module")
def swapped_pair(tmp_path_factory, other_pair):
    """``other_pair`` with its towers swapped: the bigG in text_encoder/, the ViT-L in text_encoder_2/."""
    swapped = tmp_path_factory.mktemp("pairs") / "swapped"
    shutil.copytree(other_pair, swapped)
    for a, b in (("text_encoder", "text_encoder_2"), ("tokenizer", "tokenizer_2")):
        (swapped / a).rename(swapped / "tmp")
        (swapped / b).rename(swapped / a)
        (swapped / "tmp").rename(swapped / b)
    return swapped


def _count_compare_calls(monkeypatch):
    """Record the variant names of every SDXL ``compare(text_encoders=...)`` call (one denoising loop each)."""
    from safer_diffusion.pipeline_safer_stable_diffusion_xl import SaferStableDiffusionXLPipeline

    calls, real = [], SaferStableDiffusionXLPipeline.compare

    def counting(self, *args, **kwargs):
        calls.append(list(kwargs.get("text_encoders") or ["original", "safe"]))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(SaferStableDiffusionXLPipeline, "compare", counting)
    return calls


def test_three_sdxl_variants_share_one_loop_and_equal_separate_runs(compared, other_pair, tmp_path, monkeypatch):
    """original, safe and a third pair: a row for each, from one N-way compare() per batch; each variant's images equal
    those of a run of it alone (same latents and seeds), and the third pair conditions differently."""
    calls = _count_compare_calls(monkeypatch)
    three, alone = tmp_path / "three", tmp_path / "alone"
    encoders = ["--encoders", "original", "safe", f"other={other_pair}"]
    assert main(["--tiny", "--tiny_variant", "sdxl", *SMALL, *encoders, "--output_dir", str(three)]) == 0
    assert calls == [["original", "safe", "other"]]  # 2 prompts x 2 images: one batch, one denoising loop for all three
    rows = read_results(three)
    assert len(rows) == 2 * 2 * 3 and {r["variant"] for r in rows} == {"original", "safe", "other"}
    summary = json.loads((three / "summary.json").read_text())
    assert summary["variants"] == ["original", "safe", "other"]
    assert set(summary["difference"]) == {"safe_minus_original", "other_minus_original"}
    stored = json.loads((three / "settings.json").read_text())["settings"]["encoders"]
    assert stored == {"original": "base", "safe": "tiny:sdxl", "other": str(other_pair.resolve())}
    for variant in ("original", "safe"):  # == the one-pass original + safe run
        a, b = _images(three, variant), _images(compared, variant)
        assert set(a) == set(b) and all(np.abs(a[k] - b[k]).max() <= 1 for k in a), variant
    calls.clear()
    assert main(["--tiny", "--tiny_variant", "sdxl", *SMALL, "--encoders", f"other={other_pair}", "--output_dir", str(alone)]) == 0
    assert calls == [["other"]]
    a, b = _images(alone, "other"), _images(three, "other")
    assert set(a) == set(b) and all(np.abs(a[k] - b[k]).max() <= 1 for k in a)
    safe = _images(three, "safe")
    assert np.mean([np.abs(b[k] - safe[k]).mean() for k in b]) > 1.0  # the third pair really conditions differently


def test_an_sdxl_run_resumes_and_adds_a_pair_variant(compared, other_pair, tmp_path, monkeypatch):
    out = tmp_path / "out"
    base = ["--tiny", "--tiny_variant", "sdxl", *SMALL, "--output_dir", str(out)]
    assert main([*base, "--encoders", "original", f"other={other_pair}"]) == 0
    before = {(r["prompt_id"], r["seed"], r["variant"]): r for r in read_results(out)}
    assert len(before) == 8
    calls = _count_compare_calls(monkeypatch)
    assert main([*base, "--encoders", "original", "safe", f"other={other_pair}"]) == 0
    assert calls == [["safe"]]  # only the new variant's rows are generated
    rows = read_results(out)
    assert len(rows) == 12 and {(r["prompt_id"], r["seed"], r["variant"]): r for r in rows if r["variant"] != "safe"} == before
    a, b = _images(out, "safe"), _images(compared, "safe")
    assert set(a) == set(b) and all(np.abs(a[k] - b[k]).max() <= 1 for k in a)
    calls.clear()
    results = (out / "results.jsonl").read_bytes()
    assert main([*base, "--encoders", "original", "safe", f"other={other_pair}"]) == 0  # nothing left to generate
    assert calls == [] and (out / "results.jsonl").read_bytes() == results
    assert json.loads((out / "summary.json").read_text())["variants"] == ["original", "safe", "other"]


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


def test_sdxl_bad_inputs_exit_2_before_any_model_loads(tmp_path, capsys, monkeypatch, swapped_pair):
    from safer_diffusion.testing import save_tiny_clip, save_tiny_sdxl_export, tiny_pipeline_folders

    sd_base, sd_clip = tiny_pipeline_folders()
    xl_base, export = tiny_pipeline_folders(variant="sdxl")
    third = save_tiny_clip(tmp_path / "third", seed=7)
    single = save_tiny_sdxl_export(tmp_path / "single", seed=8, text_encoders=("text_encoder",))
    capsys.readouterr()  # the bars of building the tiny models

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr("safer_diffusion.evaluation.generate.load_safer_pipeline", no_loading)
    monkeypatch.setattr("safer_diffusion.evaluation.run.build_scorers", no_loading)
    cases = [
        (["--tiny", "--tiny_variant", "sdxl", "--encoders", "original", "safe", f"single={single}"],
         r"^safer-diffusion evaluate: error: `--encoders single`='.*single' is a single-encoder export \(text_encoder/ only, as "
         r"made for SD 1\.x/2\.x\)\. An SDXL base conditions on two text encoders, and this export lacks the safe text_encoder_2 "
         r"\(OpenCLIP ViT-bigG/14 with projection, 1280 wide in SDXL\), so the bigG path would stay unsafe\. Pass an SDXL export "
         r"holding both \(text_encoder/ and text_encoder_2/, .*\)\.$"),
        (["--base", str(xl_base), "--safe_encoder", str(export), "--encoders", "original", "safe", f"third={third}"],
         r"`--encoders third`='.*third' is one text encoder, but an SDXL base conditions on two: .*The safe text_encoder_2 is "
         r"missing: pass an SDXL export holding both .*\)\.$"),
        (["--tiny", "--tiny_variant", "sdxl", "--encoders", "original", f"swapped={swapped_pair}"],
         r"`--encoders swapped/text_encoder` and `--encoders swapped/text_encoder_2` are swapped: `--encoders swapped/text_encoder` "
         r"has the shape of the base's text_encoder_2 \(width, layers\) \(32, 3\) and `--encoders swapped/text_encoder_2` that of "
         r"its text_encoder \(32, 2\)\."),
        (["--base", str(xl_base), "--safe_encoder", str(swapped_pair)],
         r"`--safe_encoder/text_encoder` and `--safe_encoder/text_encoder_2` are swapped"),
        (["--tiny", "--encoders", "original", f"pair={export}"],
         r"`--encoders pair`='.*' holds a pair of SDXL text encoders \(text_encoder/ and text_encoder_2/\), but `--base` 'tiny:sd1' is "
         r"a Stable Diffusion 1\.x/2\.x pipeline, which conditions on one text encoder; pass an SDXL `--base`, or a single encoder "
         r"\(only the pair's CLIP ViT-L/14 tower: '.*/text_encoder'\)\.$"),
        (["--base", str(xl_base), "--safe_encoder", str(export), "--encoders", "original", "safe", "advunlearn"],
         r"`--encoders advunlearn` is the nudity-unlearned CLIP-L text encoder: one text encoder, but `--base` '.*' is SDXL, "
         r"whose variants are pairs \(text_encoder and text_encoder_2\); pass NAME=FOLDER of a two-encoder export"),
        (["--base", str(sd_base), "--safe_encoder", str(export)],
         r"`--safe_encoder`='.*' holds a pair of SDXL text encoders .*but `--base` '.*' is a Stable Diffusion 1\.x/2\.x pipeline"),
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
