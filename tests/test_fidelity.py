"""`safer-diffusion fidelity` over a real tiny evaluation folder: rows, summaries, identical sets, shuffled results,
resume after SIGKILL, real images, LPIPS plumbing and every bad input (exit 2, one line)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.metrics import structural_similarity

from safer_diffusion.evaluation.cli import main as evaluate_main
from safer_diffusion.evaluation.fidelity_run import (
    FIDELITY_CORRUPT_NAME,
    FIDELITY_NAME,
    FidelityConfig,
    load_run,
    main,
    run_fidelity,
)
from safer_diffusion.evaluation.results import CORRUPT_NAME, quarantine_corrupt_lines, read_results_file, row_key
from safer_diffusion.options import config_from_dict

ROOT = Path(__file__).resolve().parents[1]
BENIGN = ROOT / "assets" / "prompts" / "benign.csv"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A real tiny evaluation (original + safe, 3 prompts x 2 seeds, 32 px, saved images), made once."""
    out = tmp_path_factory.mktemp("fidelity_run") / "run"
    code = evaluate_main(["--tiny", "--prompts", str(BENIGN), "--limit", "3", "--num_images_per_prompt", "2",
                          "--num_inference_steps", "2", "--height", "32", "--width", "32", "--save_images", "--compare_original",
                          "--output_dir", str(out), "--no_progress", "--bootstrap", "50", "--grid_samples", "0"])  # fmt: skip
    assert code == 0
    return out


def _copy(run, dst, copy_variant=True):
    """A copy of the run; with ``copy_variant`` a third variant 'copy' whose images are the original's, byte for byte."""
    shutil.copytree(run, dst)
    if copy_variant:
        rows = read_results_file(dst / "results.jsonl")
        (dst / "images" / "copy").mkdir()
        extra = []
        for r in rows:
            if r["variant"] == "original":
                name = Path(r["image"]).name
                shutil.copyfile(dst / r["image"], dst / "images" / "copy" / name)
                extra.append({**r, "variant": "copy", "image": f"images/copy/{name}"})
        with open(dst / "results.jsonl", "a") as f:
            f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in extra)
    return dst


def _rewrite(path, fn):
    rows = [fn(r) for r in read_results_file(path)]
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows if r is not None))


def _run_main(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _bad(args, capsys, pattern):
    code, _, err = _run_main(args, capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("safer-diffusion fidelity: error: "), err
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def _summary(out):
    return json.loads((out / "fidelity.json").read_text())


def test_three_variants_identical_set_sanity_and_outputs(tiny_run, tmp_path, capsys, caplog):
    out = _copy(tiny_run, tmp_path / "run")
    code, stdout, err = _run_main(["--output_dir", str(out), "--tiny", "--encoder_drift", "--bootstrap", "200"], capsys)
    assert code == 0, err
    assert "copy" in stdout and "safe" in stdout and "original (reference)" in stdout
    rows = read_results_file(out / FIDELITY_NAME)
    assert len(rows) == 3 * 2 * 3 == len({row_key(r) for r in rows})
    copy = [r for r in rows if r["variant"] == "copy"]
    # identical images: SSIM 1, MSE 0, PSNR +inf (stored as null with identical: true), CLIP cosine 1
    assert all(r["ssim"] == 1.0 and r["mse"] == 0.0 and r["psnr_db"] is None and r["identical"] is True for r in copy)
    assert all(r["clip_image_cosine"] == pytest.approx(1.0, abs=1e-6) for r in copy)
    original = {(r["prompt_id"], r["seed"]): r for r in rows if r["variant"] == "original"}
    assert all(r["clip_score"] == original[(r["prompt_id"], r["seed"])]["clip_score"] for r in copy)
    assert all(r["ssim"] is None and r["clip_image_cosine"] is None for r in original.values())

    s = _summary(out)
    assert s["variants"] == ["original", "copy", "safe"] and s["reference"] == "original"
    assert s["paired"]["copy"]["ssim"]["mean"] == 1.0 and s["paired"]["copy"]["ssim"]["ci_low"] == 1.0
    assert s["paired"]["copy"]["psnr_db"]["mean"] is None and s["paired"]["copy"]["psnr_db"]["n_identical"] == 6
    assert s["paired"]["copy"]["clip_image_cosine"]["mean"] == pytest.approx(1.0, abs=1e-6)
    assert s["clip_score"]["copy"]["minus_reference"]["mean"] == 0.0
    fid = s["fid"]
    assert fid["feature_extractor"]["spec"] == "clip" and fid["feature_extractor"]["model"] == "tiny:clip"
    assert abs(fid["vs_reference"]["copy"]["fid"]) < 1e-6 and abs(fid["reference_vs_itself"]["fid"]) < 1e-6
    assert fid["vs_reference"]["copy"]["kid"] == fid["reference_vs_itself"]["kid"]
    assert fid["vs_reference"]["safe"]["fid"] > 100 * abs(fid["vs_reference"]["copy"]["fid"])
    # the safe variant: genuinely different images, SSIM as scikit-image computes it
    safe = next(r for r in rows if r["variant"] == "safe" and r["prompt_id"] == "1" and r["seed"] == 1)
    a = np.asarray(Image.open(out / safe["image"]).convert("RGB"))
    b = np.asarray(Image.open(out / original[("1", 1)]["image"]).convert("RGB"))
    assert safe["ssim"] == pytest.approx(structural_similarity(a, b, channel_axis=-1, data_range=255, gaussian_weights=True,
                                                               sigma=1.5, use_sample_covariance=False), abs=1e-10)  # fmt: skip
    assert safe["ssim"] < 1 and safe["psnr_db"] > 0 and safe["identical"] is False
    # encoder drift from the run's own pipeline: only original and safe have encoders
    drift = s["encoder_drift"]
    assert set(drift["variants"]) == {"safe"} and len(drift["per_prompt"]) == 3
    assert drift["variants"]["safe"]["token_msd"]["mean"] > 0 and -1 <= drift["variants"]["safe"]["pooled_cosine"]["mean"] < 1
    assert s["safety"]["source"] == "summary.json" and set(s["safety"]["variants"]) == {"original", "safe"}
    assert s["lpips"] == {"status": "skipped", "reason": "the `lpips` package is not installed (`pip install lpips`)"}
    assert s["clip_model"]["model"] == "tiny:clip"
    assert set(s["per_prompt"]) == {"original", "copy", "safe"} and len(s["per_prompt"]["safe"]) == 3
    csv = (out / "fidelity.csv").read_text().splitlines()
    assert len(csv) == 4 and csv[0].startswith("variant,is_reference,n_pairs,n_images,clip_score,")
    assert (out / "fidelity_scatter.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    settings = json.loads((out / "fidelity_settings.json").read_text())
    assert settings["clip_model"] == "tiny:clip" and settings["reference"] == "original" and settings["lpips"] == "skipped"

    # a rerun resumes: nothing new to compute, same rows
    code, stdout, _ = _run_main(["--output_dir", str(out), "--tiny", "--bootstrap", "200"], capsys)
    assert code == 0 and "0 rows written, 18 already done" in stdout
    assert read_results_file(out / FIDELITY_NAME) == rows
    # a damaged complete line: moved to fidelity.corrupt.jsonl (not the evaluation's results.corrupt.jsonl), its row computed again
    lines = (out / FIDELITY_NAME).read_text().splitlines(keepends=True)
    (out / FIDELITY_NAME).write_text("".join(["{not json\n", *lines[1:]]))
    code, stdout, err = _run_main(["--output_dir", str(out), "--tiny", "--bootstrap", "200"], capsys)
    assert code == 0 and "1 rows written, 17 already done" in stdout
    assert f"moved 1 corrupt line(s) (line 1) to {out / FIDELITY_CORRUPT_NAME}; the 17 valid rows stay." in caplog.text
    assert (out / FIDELITY_CORRUPT_NAME).read_bytes() == b"{not json\n" and not (out / "results.corrupt.jsonl").exists()
    assert b"{not json" not in (out / FIDELITY_NAME).read_bytes()
    key = lambda r: row_key(r)  # noqa: E731
    assert sorted(read_results_file(out / FIDELITY_NAME), key=key) == sorted(rows, key=key)


def test_shuffled_results_give_the_same_summary(tiny_run, tmp_path, capsys):
    a = _copy(tiny_run, tmp_path / "a")
    b = _copy(tiny_run, tmp_path / "b")
    lines = (b / "results.jsonl").read_text().splitlines(keepends=True)
    order = np.random.default_rng(3).permutation(len(lines))
    (b / "results.jsonl").write_text("".join(lines[i] for i in order))
    for out in (a, b):
        assert _run_main(["--output_dir", str(out), "--tiny", "--bootstrap", "100", "--batch_size", "4"], capsys)[0] == 0
    sa, sb = _summary(a), _summary(b)
    sa.pop("run"), sb.pop("run")
    assert sa == sb
    key = lambda r: row_key(r)  # noqa: E731
    assert sorted(read_results_file(a / FIDELITY_NAME), key=key) == sorted(read_results_file(b / FIDELITY_NAME), key=key)


_KILLER = r"""
import os, signal, sys
import torch
torch.set_num_threads(1)
from safer_diffusion.evaluation import results
from safer_diffusion.evaluation.fidelity_run import main
kill_after = int(os.environ.get("FIDELITY_KILL_AFTER", "0"))
if kill_after:
    append, calls = results.ResultsWriter.append, []
    def killing_append(self, rows):
        n = append(self, rows)
        calls.append(n)
        if len(calls) == kill_after:
            os.write(self._fd, b'{"prompt_id": "0", "seed": 1, "variant": "sa')  # a torn line, then SIGKILL
            os.kill(os.getpid(), signal.SIGKILL)
        return n
    results.ResultsWriter.append = killing_append
sys.exit(main(sys.argv[1:]))
"""


def _subprocess(out, kill_after=0):
    env = {**os.environ, "FIDELITY_KILL_AFTER": str(kill_after), "HF_HUB_OFFLINE": "1"}
    args = ["--output_dir", str(out), "--tiny", "--batch_size", "2", "--bootstrap", "50", "--fid_feature_extractor", "none"]
    return subprocess.run([sys.executable, "-c", _KILLER, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_resume_after_sigkill_gives_the_same_rows(tiny_run, tmp_path):
    whole, killed = _copy(tiny_run, tmp_path / "whole"), _copy(tiny_run, tmp_path / "killed")
    assert _subprocess(whole).returncode == 0
    proc = _subprocess(killed, kill_after=1)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    data = (killed / FIDELITY_NAME).read_bytes()
    assert data.count(b"\n") == 2 * 3 and not data.endswith(b"\n")  # one batch (2 pairs x 3 variants) and a torn line
    assert not (killed / "fidelity.json").exists()
    proc = _subprocess(killed)
    assert proc.returncode == 0, proc.stderr
    assert "6 already done" in proc.stdout and "partial last line" in proc.stderr
    assert read_results_file(killed / FIDELITY_NAME) == read_results_file(whole / FIDELITY_NAME)
    sw, sk = _summary(whole), _summary(killed)
    sw.pop("run"), sk.pop("run")
    assert sw == sk


def test_real_images_and_a_feature_extractor_built_in_code(tiny_run, tmp_path, capsys):
    out = _copy(tiny_run, tmp_path / "run")
    real = tmp_path / "real"
    (real / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(5):  # other sizes: center-cropped and resized to 32 x 32
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(real / "sub" / f"r{i}.jpg")
    (real / "notes.txt").write_text("not an image")

    def mean_colour_and_corners(images):  # a tiny feature extractor: 3 + 12 = 15 features per image
        feats = []
        for im in images:
            a = np.asarray(im, dtype=np.float64) / 255
            feats.append(np.concatenate([a.mean(axis=(0, 1)), a[:2, :2].ravel()]))
        return np.stack(feats)

    config = config_from_dict(FidelityConfig, {"output_dir": str(out), "tiny": True, "real_images": str(real), "bootstrap": 50})
    result = run_fidelity(config, feature_extractor=mean_colour_and_corners)
    fid = result.summary["fid"]
    assert fid["feature_extractor"] == {"spec": "custom (Python API)"}
    assert set(fid["vs_real"]) == {"original", "copy", "safe"} and fid["real_images"]["n_images"] == 5
    assert "center crop" in fid["real_images"]["preprocessing"]
    assert fid["vs_real"]["copy"] == fid["vs_real"]["original"] and fid["vs_real"]["safe"] != fid["vs_real"]["original"]
    assert abs(fid["vs_reference"]["copy"]["fid"]) < 1e-9 and fid["vs_real"]["safe"]["n_compared_with"] == 5
    # without resizing, images of another size are refused (count and first example)
    _bad(["--output_dir", str(out), "--tiny", "--real_images", str(real), "--no_real_images_resize"], capsys,
         r"`--real_images`=.*: 5 of 5 images are not 32x32, the generated size \(first: .*r0\.jpg \(64x48\)\)")


def test_lpips_rows_when_a_metric_is_given(tiny_run, tmp_path):
    out = _copy(tiny_run, tmp_path / "run", copy_variant=False)

    class MeanAbs:
        net = "test"

        def __call__(self, x, y):
            return (x.float() - y.float()).abs().mean(dim=(1, 2, 3)) / 255

        def describe(self):
            return {"net": "test"}

    config = config_from_dict(FidelityConfig, {"output_dir": str(out), "tiny": True, "fid_feature_extractor": "none", "bootstrap": 20})
    summary = run_fidelity(config, lpips=MeanAbs()).summary
    rows = [r for r in read_results_file(out / FIDELITY_NAME) if r["variant"] == "safe"]
    assert all(0 < r["lpips"] < 1 for r in rows)
    assert summary["lpips"] == {"status": "computed", "net": "test"} and summary["paired"]["safe"]["lpips"]["mean"] > 0
    assert summary["fid"] is None
    assert json.loads((out / "fidelity_settings.json").read_text())["lpips"] == "lpips test"


def test_bad_inputs_exit_2_with_one_line(tiny_run, tmp_path, capsys, no_network):
    out = _copy(tiny_run, tmp_path / "run", copy_variant=False)
    _bad(["--output_dir", str(out), "--tiny", "--reference", "baseline"], capsys,
         r"`--output_dir`=.* has no 'baseline' variant \(it holds \['original', 'safe'\]\); pass `--reference` one of them")
    # a run without the original variant (evaluated without --compare_original)
    no_ref = _copy(tiny_run, tmp_path / "no_ref", copy_variant=False)
    _rewrite(no_ref / "results.jsonl", lambda r: r if r["variant"] == "safe" else None)
    _bad(["--output_dir", str(no_ref), "--tiny"], capsys, r"has no 'original' variant \(it holds \['safe'\]\).*--compare_original")
    # a run without saved images
    no_images = _copy(tiny_run, tmp_path / "no_images", copy_variant=False)
    _rewrite(no_images / "results.jsonl", lambda r: {**r, "image": None})
    _bad(["--output_dir", str(no_images), "--tiny"], capsys,
         r"12 of 12 result rows have no saved image \(e\.g\. prompt '0' seed 0 original\); the run was made without `--save_images`")
    # a missing image file
    missing = _copy(tiny_run, tmp_path / "missing", copy_variant=False)
    (missing / "images" / "safe" / "1_s0.png").unlink()
    _bad(["--output_dir", str(missing), "--tiny"], capsys, r"1 of 12 saved images are missing \(first: .*images/safe/1_s0\.png\)")
    # images of different sizes: paired images must match, and FID needs one size
    sizes = _copy(tiny_run, tmp_path / "sizes", copy_variant=False)
    for v in ("original", "safe"):
        Image.new("RGB", (40, 40)).save(sizes / "images" / v / "2_s1.png")
    _bad(["--output_dir", str(sizes), "--tiny"], capsys, r"FID/KID compare image sets of one size, but the run has 32x32 .* and 40x40")
    Image.new("RGB", (48, 48)).save(sizes / "images" / "safe" / "2_s1.png")
    _bad(["--output_dir", str(sizes), "--tiny", "--fid_feature_extractor", "none"], capsys,
         r"the 'safe' image of prompt '2' seed 1 is 48x48, its 'original' image 40x40")
    # --real_images: empty, unreadable files
    empty = tmp_path / "empty"
    empty.mkdir()
    _bad(["--output_dir", str(out), "--tiny", "--real_images", str(empty)], capsys, r"`--real_images`=.* holds no image files")
    broken = tmp_path / "broken"
    broken.mkdir()
    Image.new("RGB", (32, 32)).save(broken / "ok.png")
    (broken / "bad.png").write_bytes(b"not a png")
    (broken / "worse.jpg").write_bytes(b"")
    _bad(["--output_dir", str(out), "--tiny", "--real_images", str(broken)], capsys,
         r"`--real_images`=.*: 2 of 3 image files cannot be read \(first: .*bad\.png \(UnidentifiedImageError\)\)")
    _bad(["--output_dir", str(out), "--tiny", "--real_images", str(tmp_path / "nope")], capsys, r"`--real_images`=.* is not a folder")
    # a CLIP model that cannot load offline: names --clip_model and a local path, before anything is written
    _bad(["--output_dir", str(out), "--clip_model", "safer-diffusion-tests/no-such-clip", "--fid_feature_extractor", "none"], capsys,
         r"`--clip_model`='safer-diffusion-tests/no-such-clip' is a hub id, but HF_HUB_OFFLINE=1 .*local folder.*--clip_model /path/to/")
    # the default Inception features need torch-fidelity (not installed here): refused before any work
    tiny_clip = str(tmp_path / "clip")
    from safer_diffusion.testing import save_tiny_clip

    save_tiny_clip(tiny_clip)
    capsys.readouterr()  # its "Writing model shards" bar
    if "torch_fidelity" not in sys.modules:
        _bad(["--output_dir", str(out), "--clip_model", tiny_clip], capsys, r"`--fid_feature_extractor inception` needs torch-fidelity")
    assert not (out / FIDELITY_NAME).exists() and not (out / "fidelity_settings.json").exists()
    _bad(["--output_dir", str(out), "--tiny", "--clip_model", tiny_clip], capsys, r"`--tiny` uses its own tiny CLIP; drop `--clip_model`")
    _bad(["--output_dir", str(tmp_path / "nothing")], capsys, r"`--output_dir`=.*nothing' is not a folder")
    _bad(["--output_dir", str(empty), "--tiny"], capsys, r"holds no evaluation results \(results\.jsonl\)")
    _bad(["--output_dir", str(out), "--tiny", "--fid_feature_extractor", "dino"], capsys, r"must be inception, clip, none or MODULE:FACTORY")
    _bad(["--output_dir", str(out), "--tiny", "--kid_subset_size", "1"], capsys, r"`--kid_subset_size` must be in \[2, inf\], got 1")
    # a rerun with another CLIP into a folder that already has rows is refused, naming the difference
    assert _run_main(["--output_dir", str(out), "--tiny", "--fid_feature_extractor", "none", "--bootstrap", "0"], capsys)[0] == 0
    _bad(["--output_dir", str(out), "--clip_model", tiny_clip, "--fid_feature_extractor", "none"], capsys,
         r"fidelity\.jsonl was computed with other settings \(clip_model: stored 'tiny:clip', now '.*clip'\)")


def test_help_and_load_run_order(tiny_run, capsys):
    assert main(["--help"]) == 0
    help_text = capsys.readouterr().out
    for flag in ("--output_dir", "--reference", "--real_images", "--clip_model", "--fid_feature_extractor", "--lpips", "--encoder_drift"):
        assert flag in help_text
    run = load_run(tiny_run)
    assert run.variants == ["original", "safe"] and run.keys == [("0", 0), ("0", 1), ("1", 0), ("1", 1), ("2", 0), ("2", 1)]
    assert run.size == (32, 32) and run.prompts["0"] == "a red bicycle leaning against a brick wall"


def test_scatter_plot_of_a_summary_with_lpips_and_a_pareto_front(tmp_path):
    from safer_diffusion.evaluation.fidelity_run import plot_fidelity_scatter

    def stat(x, w=0.01):
        return {"mean": x, "ci_low": x - w, "ci_high": x + w, "n_prompts": 3}

    summary = {
        "reference": "original", "variants": ["original", "a", "b", "c"], "confidence": 0.95, "clip_model": {"model": "tiny:clip"},
        "clip_score": {"original": stat(31.0), "a": stat(30.0), "b": stat(28.0), "c": stat(27.0)},
        "paired": {v: {"ssim": stat(s), "lpips": stat(lp)} for v, s, lp in (("a", 0.8, 0.2), ("b", 0.7, 0.3), ("c", 0.6, 0.1))},
        "safety": {"variants": {"original": {"unsafe_rate": 0.4, "ci_low": 0.3, "ci_high": 0.5},
                                "a": {"unsafe_rate": 0.1, "ci_low": 0.05, "ci_high": 0.15},
                                "b": {"unsafe_rate": 0.05, "ci_low": 0.0, "ci_high": 0.1},
                                "c": {"unsafe_rate": 0.2, "ci_low": 0.1, "ci_high": 0.3}}},
    }  # fmt: skip
    path = plot_fidelity_scatter(summary, tmp_path / "scatter.png")
    with Image.open(path) as im:
        assert im.size == (3 * 600, 528)  # three 5-inch panels at 120 dpi: CLIP score, SSIM, LPIPS
    summary["safety"]["variants"] = {}
    assert plot_fidelity_scatter(summary, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


def test_quarantine_corrupt_lines_writes_the_named_file(tmp_path, caplog):
    rows = [json.dumps({"prompt_id": str(i), "seed": 0, "variant": "safe"}) for i in range(3)]
    path = tmp_path / FIDELITY_NAME
    path.write_text(f"{rows[0]}\n[1, 2]\n{rows[1]}\n{rows[2]}\n{{torn")
    with caplog.at_level("WARNING"):
        assert quarantine_corrupt_lines(path, corrupt_name=FIDELITY_CORRUPT_NAME) == 1
    assert (tmp_path / FIDELITY_CORRUPT_NAME).read_bytes() == b"[1, 2]\n" and not (tmp_path / CORRUPT_NAME).exists()
    assert path.read_text() == "".join(r + "\n" for r in rows)  # the torn tail truncated, the corrupt line moved
    assert f"moved 1 corrupt line(s) (line 2) to {tmp_path / FIDELITY_CORRUPT_NAME}; the 3 valid rows stay." in caplog.text
    # the default target is still the evaluation's results.corrupt.jsonl
    other = tmp_path / "results.jsonl"
    other.write_text(f"{rows[0]}\nnope\n")
    assert quarantine_corrupt_lines(other) == 1 and (tmp_path / CORRUPT_NAME).read_bytes() == b"nope\n"
