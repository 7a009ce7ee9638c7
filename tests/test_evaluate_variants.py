"""Evaluation runs on the tiny pipeline: protocols recomputed from stored scores equal fresh runs, many encoders
in one run (same latents and seeds), resume per (prompt, seed, variant), adding an encoder, the report."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from safer_diffusion.evaluation.config import EvaluateConfig, config_from_args
from safer_diffusion.evaluation.generate import load_pipeline
from safer_diffusion.evaluation.results import read_results, row_key
from safer_diffusion.evaluation.run import run_evaluation
from safer_diffusion.evaluation.summarize import main as summarize_main
from safer_diffusion.options import resolve_device_and_dtype
from safer_diffusion.scoring import ScoreResult

ROOT = Path(__file__).resolve().parents[1]
MILD = ROOT / "assets" / "prompts" / "mild_unsafe.csv"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class PixelNudeNet:
    """A NudeNet stand-in whose class scores are a hash of the image's pixels (tiny models draw noise, on which the
    real detector finds nothing): it stores what NudeNetScorer stores and flags the same way (classes, >= threshold)."""

    name = "nudenet"

    def __init__(self, classes, threshold):
        self.classes, self.threshold = tuple(classes), float(threshold)

    def score(self, images):
        out = []
        for im in images:
            digest = hashlib.sha1(np.asarray(im.convert("RGB")).tobytes()).digest()
            # deterministic, spread over [0.2, 1): some images above 0.6, some between 0.45 and 0.6, some below
            cs = {"FEET_EXPOSED": round(0.2 + 0.8 * digest[0] / 256, 4), "FEMALE_BREAST_EXPOSED": round(0.2 + 0.8 * digest[1] / 256, 4),
                  "FACE_FEMALE": 0.9}  # fmt: skip
            top = max(cs.get(c, 0.0) for c in self.classes)
            out.append(ScoreResult(flagged=top >= self.threshold, score=top, details={"class_scores": cs, "detections": []}))
        return out

    def describe(self):
        return {"name": "nudenet", "model": "pixel test double", "classes": list(self.classes), "threshold": self.threshold}


def _scorers(cfg):
    from safer_diffusion.scoring import DEFAULT_CLASSES

    return {"nudenet": PixelNudeNet(cfg.nudenet_classes or DEFAULT_CLASSES, cfg.thresholds.get("nudenet", 0.6))}


@pytest.fixture(scope="module")
def tiny_pipe():
    from safer_diffusion.testing import tiny_pipeline_folders

    base, safe = tiny_pipeline_folders()
    cfg = EvaluateConfig(prompts=str(MILD), output_dir="unused", tiny=True, compare_original=True)
    return load_pipeline(cfg, str(base), str(safe), "cpu", resolve_device_and_dtype("cpu", "float32")[1])


def _config(out, *extra):
    return config_from_args(["--tiny", "--prompts", str(MILD), "--output_dir", str(out), "--num_inference_steps", "2", "--height", "32",
                             "--width", "32", "--no_progress", "--bootstrap", "200", "--grid_samples", "2", *extra])  # fmt: skip


def _run(cfg, pipe, scorers=None, **kw):
    return run_evaluation(cfg, pipe=pipe, scorers=scorers if scorers is not None else _scorers(cfg), process_index=0, num_processes=1, **kw)


def test_recomputing_a_protocol_from_stored_scores_equals_a_fresh_run_under_it(tmp_path, tiny_pipe, capsys):
    args = ("--compare_original", "--limit", "4", "--num_images_per_prompt", "2")
    a, b = tmp_path / "a", tmp_path / "b"
    _run(_config(a, *args, "--protocol", "nudity-0.6"), tiny_pipe)
    fresh = _run(_config(b, *args, "--protocol", "nudity-0.45"), tiny_pipe).summary
    assert summarize_main([str(a), "--protocol", "nudity-0.45", "--bootstrap", "200"]) == 0
    recomputed = json.loads((a / "summary.nudity-0.45.json").read_text())
    assert recomputed["rates"] == json.loads(json.dumps(fresh["rates"])) and recomputed["difference"] == json.loads(json.dumps(fresh["difference"]))
    assert recomputed["unsafe_protocol"]["name"] == fresh["unsafe_protocol"]["name"] == "nudity-0.45"
    own = json.loads((a / "summary.json").read_text())  # the run's own protocol stays in summary.json
    assert own["unsafe_protocol"]["name"] == "nudity-0.6"
    n45 = recomputed["rates"]["safe"]["all_images_micro"]["n_unsafe"] + recomputed["rates"]["original"]["all_images_micro"]["n_unsafe"]
    n6 = own["rates"]["safe"]["all_images_micro"]["n_unsafe"] + own["rates"]["original"]["all_images_micro"]["n_unsafe"]
    assert 0 < n6 < n45 < 16  # the two protocols really disagree on these images
    # the rows of the fresh run were flagged by its protocol; a row's flags follow its stored class scores
    for r in read_results(b):
        cs = r["scores"]["nudenet"]["details"]["class_scores"]
        assert r["unsafe"] == (max(cs["FEET_EXPOSED"], cs["FEMALE_BREAST_EXPOSED"]) > 0.45)
    board = (a / "leaderboard.md").read_text()
    assert "## nudity-0.6" in board and "## nudity-0.45" in board
    settings = json.loads((a / "settings.json").read_text())
    assert settings["settings"]["protocol"] == "nudity-0.6" and settings["settings"]["scorers"]["nudenet"]["threshold"] == 0.6
    p = own["unsafe_protocol"]
    assert (p["images_per_prompt"], p["num_inference_steps"], p["scheduler"], p["guidance_scale"], p["size"]) == (
        2, 2, type(tiny_pipe.scheduler).__name__, 7.5, "32x32")  # fmt: skip
    assert p["seeds"] == "0 + i, i < 2" and p["detector"].startswith("pixel test double (nudenet ")  # the model and the wheel version


# ---- many encoders in one run -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_encoders(tmp_path_factory):
    """Two tiny safe encoders (CLIPModel folders) that fit the tiny UNet, with different weights."""
    from safer_diffusion.testing import save_tiny_clip

    root = tmp_path_factory.mktemp("encoders")
    return save_tiny_clip(root / "enc-a", seed=11), save_tiny_clip(root / "enc-b", seed=12)


def _pixels(out, row):
    from PIL import Image

    return np.asarray(Image.open(out / row["image"]).convert("RGB")).astype(int)


def test_three_variants_from_the_same_latents_and_seeds(tmp_path, tiny_pipe, tiny_encoders):
    enc_a, enc_b = tiny_encoders
    common = ("--limit", "2", "--num_images_per_prompt", "2", "--save_images", "--batch_size", "3")
    three, pair, alone = tmp_path / "three", tmp_path / "pair", tmp_path / "alone"
    result = _run(_config(three, "--encoders", "original", f"a={enc_a}", f"b={enc_b}", *common), tiny_pipe)
    rows = {row_key(r): r for r in read_results(three)}
    assert len(rows) == 2 * 2 * 3 and {k[2] for k in rows} == {"original", "a", "b"} and result.n_generated == 4
    assert result.summary["variants"] == ["original", "a", "b"] and result.summary["reference"] == "original"
    assert set(result.summary["difference"]) == {"a_minus_original", "b_minus_original"}
    # `original` from the one-variant-at-a-time path equals compare()'s one-UNet-pass `original` (same latents, same seeds)
    _run(_config(pair, "--compare_original", *common), tiny_pipe)
    paired = {row_key(r): r for r in read_results(pair)}
    for key, row in rows.items():
        if key[2] == "original":
            assert np.abs(_pixels(three, row) - _pixels(pair, paired[key])).max() <= 2
    # a variant does not depend on the others generated beside it
    _run(_config(alone, "--encoders", f"a={enc_a}", *common), tiny_pipe)
    for row in read_results(alone):
        assert np.abs(_pixels(alone, row) - _pixels(three, rows[row_key(row)])).max() <= 2
    # the encoders really condition differently
    pid, seed = "0", 0
    a, b, o = (_pixels(three, rows[(pid, seed, v)]) for v in ("a", "b", "original"))
    assert np.abs(a - b).mean() > 1.0 and np.abs(a - o).mean() > 1.0
    settings = json.loads((three / "settings.json").read_text())["settings"]
    assert settings["encoders"] == {"original": "base", "a": str(enc_a.resolve()), "b": str(enc_b.resolve())}
    assert "variants" not in settings and "safe_encoder" not in settings
    from PIL import Image

    with Image.open(three / "grid.png") as grid:  # one column per variant
        assert grid.size == (180 + 160 * 3, 18 + 160 * 2)


def test_adding_an_encoder_to_a_finished_run_generates_only_its_rows(tmp_path, tiny_pipe, tiny_encoders):
    enc_a, enc_b = tiny_encoders
    out = tmp_path / "out"
    common = ("--limit", "2", "--num_images_per_prompt", "2")
    first = _run(_config(out, "--encoders", "original", f"a={enc_a}", *common), tiny_pipe)
    assert first.n_rows_written == 8
    before = {row_key(r): r for r in read_results(out)}
    added = _run(_config(out, "--encoders", "original", f"a={enc_a}", f"b={enc_b}", *common), tiny_pipe)
    assert (added.n_rows_written, added.n_skipped) == (4, 0)
    rows = read_results(out)
    assert {row_key(r): r for r in rows if r["variant"] != "b"} == before and sum(r["variant"] == "b" for r in rows) == 4
    assert added.summary["variants"] == ["original", "a", "b"]
    settings = json.loads((out / "settings.json").read_text())["settings"]
    assert set(settings["encoders"]) == {"original", "a", "b"}
    # a run of only some of the variants resumes too (nothing left), and keeps the others recorded
    again = _run(_config(out, "--encoders", f"b={enc_b}", *common), tiny_pipe)
    assert (again.n_rows_written, again.n_skipped) == (0, 4)
    assert set(json.loads((out / "settings.json").read_text())["settings"]["encoders"]) == {"original", "a", "b"}
    board = (out / "leaderboard.md").read_text()
    assert "| original |" in board and "| a |" in board and "| b |" in board
    # an existing variant's encoder cannot change
    from safer_diffusion.evaluation.settings import SettingsMismatchError

    with pytest.raises(SettingsMismatchError, match=rf"encoders\.a: stored '{enc_a.resolve()}', now '{enc_b.resolve()}'"):
        _run(_config(out, "--encoders", "original", f"a={enc_b}", *common), tiny_pipe)


def test_reference_names_the_variant_differences_are_taken_against(tmp_path, tiny_pipe, tiny_encoders):
    enc_a, enc_b = tiny_encoders
    out = tmp_path / "out"
    result = _run(_config(out, "--encoders", "original", f"a={enc_a}", f"b={enc_b}", "--reference", "a", "--limit", "1",
                          "--num_images_per_prompt", "1"), tiny_pipe)  # fmt: skip
    assert result.summary["reference"] == "a" and set(result.summary["difference"]) == {"original_minus_a", "b_minus_a"}
    table = list(__import__("csv").DictReader((out / "summary.csv").open()))
    assert {r["variant"] for r in table} == {"original", "a", "b", "original_minus_a", "b_minus_a"}


def test_an_encoder_whose_width_does_not_fit_the_base_is_refused_before_loading(tmp_path, tiny_pipe):
    from safer_diffusion.options import BadInputError
    from safer_diffusion.testing import save_tiny_clip

    narrow = save_tiny_clip(tmp_path / "narrow", seed=3, text_hidden_size=16)
    cfg = _config(tmp_path / "out", "--encoders", "original", f"narrow={narrow}", "--limit", "1", "--num_images_per_prompt", "1")
    with pytest.raises(BadInputError, match=r"^`--encoders` narrow: its text encoder has width \(hidden_size\) 16, but the base's UNet "
                                            r"expects 32 \(cross_attention_dim\)"):  # fmt: skip
        _run(cfg, tiny_pipe)
    assert not (tmp_path / "out" / "results.jsonl").exists()


def test_a_hub_encoder_offline_fails_at_once_naming_it(tmp_path, capsys, no_network):
    from safer_diffusion.evaluation.cli import main
    from safer_diffusion.testing import tiny_pipeline_folders

    base, _ = tiny_pipeline_folders()
    argv = ["--base", str(base), "--prompts", str(MILD), "--output_dir", str(tmp_path / "out"), "--encoders", "original", "advunlearn",
            "--limit", "1", "--no_progress", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("safer-diffusion evaluate: error: `--encoders advunlearn`='OPTML-Group/AdvUnlearn' is a hub id, but "
                          "HF_HUB_OFFLINE=1 is set") and err.count("\n") == 1  # fmt: skip
    assert not (tmp_path / "out" / "results.jsonl").exists()
