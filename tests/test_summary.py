"""Summary arithmetic against hand-computed rates, bootstrap CIs, CSV/JSON/plots, the results store."""

import csv
import json
import os
import shutil
from pathlib import Path

import pytest

from safer_diffusion.evaluation.results import (
    RESULTS_NAME,
    ResultsWriter,
    merge_results,
    rank_results_name,
    read_results,
    read_results_file,
    repair_results_file,
)
from safer_diffusion.evaluation.settings import SettingsMismatchError, check_settings, write_settings
from safer_diffusion.evaluation.summary import MEAN_KEY, MICRO_KEY, format_table, make_grid, summarize, write_summary

FIXTURE = Path(__file__).parent / "fixtures" / "evaluation" / "results.jsonl"

# Hand-computed from the fixture (2 images per prompt, 4 for prompt 3; unsafe = nudenet or q16):
#   original shares: p0 = 2/2, p1 = 1/2, p2 = 0/2, p3 = 1/4     safe: p0 = 1/2, p1 = 0, p2 = 0, p3 = 1/4
#   categories: violence = {p0, p1}, shocking = {p1, p2}, drugs = {p3}
ORIGINAL = {"violence": (1.0 + 0.5) / 2, "shocking": (0.5 + 0.0) / 2, "drugs": 0.25}
SAFE = {"violence": (0.5 + 0.0) / 2, "shocking": 0.0, "drugs": 0.25}


@pytest.fixture(scope="module")
def rows():
    return read_results_file(FIXTURE)


def test_rates_match_hand_computation(rows):
    s = summarize(rows, n_bootstrap=200)
    assert s["variants"] == ["original", "safe"]
    assert s["categories"] == ["drugs", "shocking", "violence"]
    assert s["scorers"] == ["nudenet", "q16"]
    for variant, expected in (("original", ORIGINAL), ("safe", SAFE)):
        r = s["rates"][variant]
        for cat, rate in expected.items():
            assert r["categories"][cat]["unsafe_rate"] == pytest.approx(rate)
        assert r[MEAN_KEY]["unsafe_rate"] == pytest.approx(sum(expected.values()) / 3)
        assert r[MEAN_KEY]["n_categories"] == 3
    # micro: unsafe images / images, every image once (p1 is in two categories but counted once)
    assert s["rates"]["original"][MICRO_KEY]["unsafe_rate"] == pytest.approx(4 / 10)
    assert s["rates"]["safe"][MICRO_KEY]["unsafe_rate"] == pytest.approx(2 / 10)
    assert s["rates"]["original"][MICRO_KEY]["n_images"] == 10 and s["rates"]["original"][MICRO_KEY]["n_prompts"] == 4
    v = s["rates"]["original"]["categories"]["violence"]
    assert (v["n_prompts"], v["n_images"], v["n_unsafe"]) == (2, 4, 3)
    # per-scorer flag rates: original violence nudenet flags p0: 1/2, p1: 1/2 -> 0.5; q16 p0: 1/2, p1: 1/2 -> 0.5
    assert v["scorer_rates"] == {"nudenet": pytest.approx(0.5), "q16": pytest.approx(0.5)}
    assert s["rates"]["safe"]["categories"]["drugs"]["scorer_rates"] == {"nudenet": pytest.approx(0.25), "q16": pytest.approx(0.0)}
    # paired difference safe - original
    d = s["difference"]["safe_minus_original"]
    assert d["categories"]["violence"]["difference"] == pytest.approx(0.25 - 0.75)
    assert d[MEAN_KEY]["difference"] == pytest.approx(sum(SAFE.values()) / 3 - sum(ORIGINAL.values()) / 3)
    assert d[MICRO_KEY]["difference"] == pytest.approx(0.2 - 0.4)


def test_bootstrap_intervals(rows):
    s = summarize(rows, n_bootstrap=1000, seed=0)
    orig = s["rates"]["original"]
    # violence: shares {1.0, 0.5}; resampled means are in {0.5, 0.75, 1.0}, each end with prob 1/4
    assert orig["categories"]["violence"]["ci_low"] == pytest.approx(0.5)
    assert orig["categories"]["violence"]["ci_high"] == pytest.approx(1.0)
    # a single prompt (drugs) or constant shares (safe shocking) give a zero-width interval
    assert orig["categories"]["drugs"]["ci_low"] == orig["categories"]["drugs"]["ci_high"] == pytest.approx(0.25)
    assert s["rates"]["safe"]["categories"]["shocking"]["ci_low"] == s["rates"]["safe"]["categories"]["shocking"]["ci_high"] == 0.0
    for variant in s["variants"]:
        for key in (MEAN_KEY, MICRO_KEY):
            e = s["rates"][variant][key]
            assert e["ci_low"] <= e["unsafe_rate"] <= e["ci_high"]
    # fixed seed: reproducible; another seed resamples differently
    assert summarize(rows, n_bootstrap=1000, seed=0)["rates"] == s["rates"]
    other = summarize(rows, n_bootstrap=1000, seed=1)["rates"]["original"][MICRO_KEY]
    assert other["unsafe_rate"] == orig[MICRO_KEY]["unsafe_rate"]
    # no bootstrap -> no intervals
    assert summarize(rows, n_bootstrap=0)["rates"]["original"][MEAN_KEY]["ci_low"] is None


def test_category_interval_does_not_depend_on_other_categories(rows):
    only_violence = [r for r in rows if "violence" in r["categories"]]
    a = summarize(rows, n_bootstrap=300)["rates"]["original"]["categories"]["violence"]
    b = summarize(only_violence, n_bootstrap=300)["rates"]["original"]["categories"]["violence"]
    assert a == b


def test_write_summary_files_and_table(tmp_path, rows):
    shutil.copy(FIXTURE, tmp_path / RESULTS_NAME)
    write_settings(tmp_path, {"images_per_prompt": 2}, {"scorers": [{"name": "nudenet", "threshold": 0.6}]})
    s = write_summary(tmp_path, n_bootstrap=100)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["rates"]["original"][MEAN_KEY]["unsafe_rate"] == pytest.approx(s["rates"]["original"][MEAN_KEY]["unsafe_rate"])
    assert on_disk["protocol"]["scorers"][0]["threshold"] == 0.6
    assert on_disk["protocol"]["settings"] == {"images_per_prompt": 2}
    with open(tmp_path / "summary.csv") as f:
        table = list(csv.DictReader(f))
    by = {(r["variant"], r["category"]): r for r in table}
    assert float(by[("original", "violence")]["unsafe_rate"]) == pytest.approx(0.75)
    assert float(by[("safe", MICRO_KEY)]["unsafe_rate"]) == pytest.approx(0.2)
    assert float(by[("safe_minus_original", "violence")]["unsafe_rate"]) == pytest.approx(-0.5)
    assert by[("original", "violence")]["n_prompts"] == "2" and by[("original", "violence")]["rate_q16"] != ""
    assert len(table) == 2 * (3 + 2) + (3 + 2)
    from PIL import Image

    with Image.open(tmp_path / "report.png") as im:
        assert im.size[0] > 300 and im.size[1] > 200
    text = format_table(s)
    assert "violence" in text and "75.0%" in text and "25.0%" in text and MEAN_KEY in text


def test_grid_blurs_flagged_images(tmp_path):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    samples = [
        {"image": noise, "variant": "original", "prompt_id": "0", "seed": 0, "prompt": "x", "unsafe": True},
        {"image": noise, "variant": "safe", "prompt_id": "0", "seed": 0, "prompt": "x", "unsafe": False},
    ]
    path = make_grid(samples, tmp_path / "grid.png", cell=64)
    grid = np.asarray(Image.open(path).convert("RGB")).astype(float)
    label_w, header = 180, 18
    flagged = grid[header + 8 : header + 56, label_w + 8 : label_w + 56]
    clean = grid[header + 8 : header + 56, label_w + 64 + 8 : label_w + 64 + 56]
    # blurring removes most pixel-to-pixel variation; the clean copy keeps it
    assert np.abs(np.diff(flagged, axis=1)).mean() < 0.3 * np.abs(np.diff(clean, axis=1)).mean()
    assert make_grid([], tmp_path / "none.png") is None


# ---- the results store --------------------------------------------------------------------------


def test_writer_appends_and_torn_last_line_is_ignored_then_repaired(tmp_path):
    path = tmp_path / RESULTS_NAME
    rows = [{"prompt_id": str(i), "seed": i, "variant": "safe", "unsafe": False} for i in range(3)]
    with ResultsWriter(path) as w:
        assert w.append(rows[:2]) == 2
    with open(path, "ab") as f:  # a crash in the middle of writing row 3
        f.write(b'{"prompt_id": "2", "seed": 2, "var')
    assert [r["prompt_id"] for r in read_results_file(path)] == ["0", "1"]
    with ResultsWriter(path) as w:  # reopening truncates the partial line, appends start clean
        w.append(rows[2:])
    assert [r["prompt_id"] for r in read_results_file(path)] == ["0", "1", "2"]
    assert path.read_bytes().endswith(b"\n") and path.read_bytes().count(b"\n") == 3
    assert repair_results_file(path) == 0


def test_repair_file_with_no_newline_at_all(tmp_path):
    path = tmp_path / RESULTS_NAME
    path.write_bytes(b'{"prompt_id": "0"')
    assert repair_results_file(path) == len(b'{"prompt_id": "0"')
    assert path.read_bytes() == b""


def test_rank_files_read_deduplicated_and_merged(tmp_path):
    def row(pid, seed, variant="safe"):
        return {"prompt_id": pid, "seed": seed, "variant": variant, "unsafe": False}

    with ResultsWriter(tmp_path / rank_results_name(1)) as w:
        w.append([row("1", 0), row("1", 1)])
    with ResultsWriter(tmp_path / rank_results_name(0)) as w:
        w.append([row("0", 0), row("2", 0)])
    with ResultsWriter(tmp_path / RESULTS_NAME) as w:
        w.append([row("0", 0)])  # duplicate of a rank-0 row
    assert len(read_results(tmp_path)) == 4
    merge_results(tmp_path, order=["0", "1", "2"])
    merged = read_results_file(tmp_path / RESULTS_NAME)
    assert [(r["prompt_id"], r["seed"]) for r in merged] == [("0", 0), ("1", 0), ("1", 1), ("2", 0)]
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_settings_mismatch_names_each_difference(tmp_path):
    settings = {"images_per_prompt": 2, "seed": 0, "scorers": {"nudenet": 0.6}}
    assert check_settings(tmp_path, settings) is False
    write_settings(tmp_path, settings)
    assert check_settings(tmp_path, settings) is True
    changed = {"images_per_prompt": 3, "seed": 0, "scorers": {"nudenet": 0.5}}
    with pytest.raises(SettingsMismatchError, match=r"(?s)images_per_prompt: stored 2, now 3.*scorers\.nudenet: stored 0\.6, now 0\.5.*new `--output_dir`"):
        check_settings(tmp_path, changed)
    (tmp_path / "settings.json").write_text("{not json")
    with pytest.raises(SettingsMismatchError, match="unreadable settings.json"):
        check_settings(tmp_path, settings)


def test_summarize_rejects_bad_arguments(rows):
    with pytest.raises(ValueError, match="`confidence` must be in"):
        summarize(rows, confidence=95)
    with pytest.raises(ValueError, match="`n_bootstrap` must be >= 0"):
        summarize(rows, n_bootstrap=-1)
