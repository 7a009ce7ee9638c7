"""The `safer-diffusion` command: generate (--tiny), score (real NudeNet), evaluate dispatch, errors."""

import json
import subprocess
import sys
import types

import pytest
from PIL import Image

from safer_diffusion.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def astronaut_png(tmp_path_factory):
    skimage_data = pytest.importorskip("skimage.data")
    path = tmp_path_factory.mktemp("img") / "astronaut.png"
    Image.fromarray(skimage_data.astronaut()).save(path)
    return path


def _lines(capsys):
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]


@pytest.mark.parametrize("command", [[], ["generate"], ["score"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([*command, "--help"])
    assert e.value.code == 0
    assert "usage: safer-diffusion" in capsys.readouterr().out


def test_python_dash_m_help():
    out = subprocess.run([sys.executable, "-m", "safer_diffusion", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "{generate,score,evaluate}" in out.stdout


def test_generate_tiny_writes_images_and_json(tmp_path, capsys):
    out = tmp_path / "out" / "cat.png"
    assert main(["generate", "a cat", "--tiny", "--out", str(out), "--steps", "2", "--scorer", "nudenet", "--device", "cpu"]) == 0
    [record] = _lines(capsys)
    assert record["path"] == str(out) and out.is_file() and Image.open(out).size == (64, 64)
    assert record["nsfw"] is False and "nudenet" in record["scores"] and record["encoder"] == "safe"


def test_generate_tiny_compare_two_prompts(tmp_path, capsys):
    out = tmp_path / "pair.png"
    argv = ["generate", "a cat", "a dog", "--out", str(out), "--tiny", "--steps", "2", "--compare", "--scorer", "nudenet"]
    assert main(argv) == 0  # the README command, with two prompts
    records = _lines(capsys)
    assert [r["encoder"] for r in records] == ["original", "original", "safe", "safe"]
    assert [r["prompt"] for r in records] == ["a cat", "a dog"] * 2
    for r in records:
        assert Image.open(r["path"]).size == (64, 64) and r["nsfw"] is False and "nudenet" in r["scores"]
    assert (tmp_path / "pair_safe_1.png").is_file()


def test_generate_offline_hub_id_fails_fast(tmp_path, capsys, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["generate", "a cat", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "`--base`='CompVis/stable-diffusion-v1-4'" in err and "--tiny" in err
    argv = ["generate", "a photo of a cat", "--out", str(tmp_path / "cat.png"), "--base", "CompVis/stable-diffusion-v1-4",
            "--safe-encoder", "Adeely93/SafeR_CLIP"]  # the README command: offline it must fail fast and clearly
    assert main(argv) == 2
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err


def test_generate_bad_inputs(tmp_path, capsys):
    assert main(["generate", "a cat", "--tiny", "--out", str(tmp_path / "x.png"), "--steps", "0"]) == 2
    assert "`--steps` must be a positive integer, got 0" in capsys.readouterr().err
    assert main(["generate", "a", "--tiny", "--out", str(tmp_path / "x.png"), "--scorer", "q16", "--steps", "1"]) == 2
    assert "`--scorer q16` needs `--q16-prompts FILE`" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "a", "--tiny", "--out", "x.png", "--safety-mode", "hide"])
    assert "invalid choice: 'hide'" in capsys.readouterr().err


def test_score_json_lines(astronaut_png, tmp_path, capsys):
    rgba = tmp_path / "astronaut_rgba.png"
    Image.open(astronaut_png).convert("RGBA").save(rgba)
    assert main(["score", str(astronaut_png), str(rgba), "--scorer", "nudenet"]) == 0
    records = _lines(capsys)
    assert [r["flagged"] for r in records] == [False, False] and records[0]["scorer"] == "nudenet"
    assert main(["score", str(astronaut_png), "--classes", "FACE_FEMALE", "--details"]) == 0
    [record] = _lines(capsys)
    assert record["flagged"] is True and record["score"] > 0.6
    assert record["details"]["class_scores"]["FACE_FEMALE"] == pytest.approx(record["score"])


def test_score_bad_inputs(astronaut_png, tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    assert main(["score", str(astronaut_png), str(text)]) == 2
    assert f"`IMAGE` '{text}' is not an image file PIL can read" in capsys.readouterr().err
    assert main(["score", str(tmp_path / "missing.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["score", str(astronaut_png), "--classes", "NOPE"]) == 2
    assert "unknown NudeNet classes ['NOPE']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["score", str(astronaut_png), "--scorer", "nudnet"])
    assert "invalid choice: 'nudnet'" in capsys.readouterr().err


def test_evaluate_dispatches_lazily(monkeypatch):
    seen = {}
    fake = types.ModuleType("safer_diffusion.evaluate")
    fake.main = lambda argv: seen.setdefault("argv", argv) and 7
    monkeypatch.setitem(sys.modules, "safer_diffusion.evaluate", fake)
    assert main(["evaluate", "--tiny", "--limit", "2"]) == 7
    assert seen["argv"] == ["--tiny", "--limit", "2"]
