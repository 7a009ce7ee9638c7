"""The `safer-diffusion` command: generate (--tiny), score (real NudeNet), evaluate dispatch, errors and exit codes."""

import errno
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
from PIL import Image

from safer_diffusion import cli
from safer_diffusion.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def astronaut_png(tmp_path_factory):
    skimage_data = pytest.importorskip("skimage.data")
    path = tmp_path_factory.mktemp("img") / "astronaut.png"
    Image.fromarray(skimage_data.astronaut()).save(path)
    return path


def _lines(capsys):
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]


def _subprocess(*args, **env):
    return subprocess.run([sys.executable, "-m", "safer_diffusion", *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", **env})  # fmt: skip


@pytest.mark.parametrize("command", [[], ["generate"], ["score"]])
def test_help(command, capsys):
    assert main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: safer-diffusion" in out
    if command == ["generate"]:  # one spelling per flag, the new vocabulary; old ones hidden
        for flag in ("--output", "--num_inference_steps", "--num_images_per_prompt", "--compare_original", "--scorers",
                     "--thresholds", "--nudenet_classes", "--q16_clip_model", "--dtype", "--verbose"):
            assert flag in out, flag
        assert "--steps" not in out and "--out " not in out and "--num-inference-steps" not in out


def test_no_or_unknown_subcommand_exits_2(capsys):
    assert main([]) == 2
    assert "required: {generate,score,evaluate,fidelity,summarize,convert}" in capsys.readouterr().err
    assert main(["paint"]) == 2
    assert "invalid choice: 'paint'" in capsys.readouterr().err


def test_python_dash_m_help():
    out = _subprocess("--help")
    assert out.returncode == 0 and "{generate,score,evaluate,fidelity,summarize,convert}" in out.stdout


def test_generate_tiny_writes_images_and_json(tmp_path, capsys):
    out = tmp_path / "out" / "cat.png"
    argv = ["generate", "a cat", "--tiny", "--output", str(out), "--num_inference_steps", "2", "--scorers", "nudenet",
            "--device", "cpu", "--dtype", "float32"]  # fmt: skip
    assert main(argv) == 0
    [record] = _lines(capsys)
    assert record["path"] == str(out) and out.is_file() and Image.open(out).size == (64, 64)
    assert record["nsfw"] is False and "nudenet" in record["scores"] and record["encoder"] == "safe"
    assert not list(out.parent.glob(".*.tmp"))


def test_generate_tiny_compare_two_prompts_and_explicit_size(tmp_path, capsys):
    out = tmp_path / "pair.png"
    argv = ["generate", "a cat", "a dog", "--output", str(out), "--tiny", "--num_inference_steps", "2", "--compare_original",
            "--scorers", "nudenet", "--thresholds", "nudenet=0.7", "--height", "64", "--width", "128"]  # fmt: skip
    assert main(argv) == 0
    records = _lines(capsys)
    assert [r["encoder"] for r in records] == ["original", "original", "safe", "safe"]
    assert [r["prompt"] for r in records] == ["a cat", "a dog"] * 2
    for r in records:
        assert Image.open(r["path"]).size == (128, 64) and r["nsfw"] is False and "nudenet" in r["scores"]
    assert (tmp_path / "pair_safe_1.png").is_file()


def test_generate_tiny_sdxl_compare_writes_both_images(tmp_path, capsys):
    out = tmp_path / "xl.png"
    argv = ["generate", "a cat", "--tiny", "--tiny_variant", "sdxl", "--output", str(out), "--num_inference_steps", "2",
            "--compare_original", "--scorers", "nudenet"]  # fmt: skip
    assert main(argv) == 0
    records = _lines(capsys)
    assert [r["encoder"] for r in records] == ["original", "safe"]
    for tag in ("original", "safe"):
        path = tmp_path / f"xl_{tag}.png"
        assert path.is_file() and Image.open(path).size == (64, 64)  # the tiny SDXL's default size
    assert all(r["nsfw"] is False and "nudenet" in r["scores"] for r in records)
    a, b = (Image.open(tmp_path / f"xl_{t}.png").tobytes() for t in ("original", "safe"))
    assert a != b  # the safe pair conditioned the second image


def test_generate_picks_the_sdxl_pipeline_from_a_local_base_folder(tmp_path, capsys):
    from safer_diffusion.testing import tiny_pipeline_folders

    base, export = tiny_pipeline_folders(variant="sdxl")
    out = tmp_path / "xl.png"
    assert main(["generate", "a cat", "--base", str(base), "--safe_encoder", str(export), "--output", str(out),
                 "--num_inference_steps", "1", "--height", "32", "--width", "32"]) == 0  # fmt: skip
    [record] = _lines(capsys)
    assert record["encoder"] == "safe" and Image.open(out).size == (32, 32)


def test_generate_sdxl_and_tiny_variant_bad_inputs_exit_2_before_any_model_loads(tmp_path, capsys, monkeypatch):
    from safer_diffusion.testing import tiny_pipeline_folders

    sd_base, sd_clip = tiny_pipeline_folders()
    xl_base, export = tiny_pipeline_folders(variant="sdxl")

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(cli, "load_safer_pipeline", no_loading)
    out = ["--output", str(tmp_path / "x.png")]
    cases = [
        (["--tiny_variant", "sdxl"], r"`--tiny_variant` sdxl picks the tiny models of `--tiny`; add `--tiny`"),
        (["--tiny", "--tiny_variant", "sd3"], r"argument --tiny_variant/--tiny-variant: invalid choice: 'sd3'"),
        (["--tiny", "--safe_encoder_2", str(export)], r"`--tiny` builds its own tiny models; drop `--base`/`--safe_encoder`/`--safe_encoder_2`"),
        (["--base", str(sd_base), "--safe_encoder", str(sd_clip), "--safe_encoder_2", str(export)],
         r"`--safe_encoder_2` is for SDXL bases \(two text encoders\), but `--base` .* is a Stable Diffusion 1\.x/2\.x pipeline"),
        (["--base", str(xl_base)], r"`--base` .* is SDXL, which conditions on two text encoders .* the default `--safe_encoder` "
                                   r"Adeely93/SafeR_CLIP is a ViT-L/14 only .* two-encoder export folder .*docs/EXPORT_FORMAT\.md section 8"),
        (["--base", str(xl_base), "--safe_encoder", str(sd_clip)],
         r"`--safe_encoder`=.* is one text encoder, but an SDXL base conditions on two: .*`--safe_encoder_2=`"),
    ]
    for extra, pattern in cases:
        assert main(["generate", "a cat", *out, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert re.search(pattern, err.strip().splitlines()[-1]), err
        assert "Traceback" not in err


def test_old_spellings_still_work_with_a_deprecation_warning(tmp_path, caplog):
    """The README's previous command: --out, --steps, --compare, --scorer, and -v before the subcommand."""
    out = tmp_path / "old.png"
    with caplog.at_level("WARNING"):
        assert main(["-v", "generate", "a cat", "--out", str(out), "--tiny", "--steps", "1", "--compare", "--scorer", "nudenet",
                     "--num-images", "1", "--dtype", "fp32"]) == 0  # fmt: skip
    err = caplog.text
    for old, new in (("--out", "--output"), ("--steps", "--num_inference_steps"), ("--compare", "--compare_original"),
                     ("--scorer", "--scorers"), ("--num-images", "--num_images_per_prompt")):
        assert f"`{old}` is deprecated and will be removed in the next release; use `{new}`" in err
    assert "`--dtype fp32` is deprecated; use `--dtype float32`" in err
    assert (tmp_path / "old_safe.png").is_file() and (tmp_path / "old_original.png").is_file()


def test_generate_offline_hub_id_fails_fast(tmp_path, capsys, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["generate", "a cat", "--output", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "`--base`='CompVis/stable-diffusion-v1-4'" in err and "--tiny" in err
    argv = ["generate", "a photo of a cat", "--output", str(tmp_path / "cat.png"), "--base", "CompVis/stable-diffusion-v1-4",
            "--safe_encoder", "Adeely93/SafeR_CLIP"]  # the README command: offline it must fail fast and clearly
    assert main(argv) == 2
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, pattern",
    [
        (["--num_inference_steps", "0"], r"`--num_inference_steps` must be in \[1, 1000\], got 0"),
        (["--num_inference_steps", "100000"], r"`--num_inference_steps` must be in \[1, 1000\], got 100000"),
        (["--guidance_scale", "inf"], r"`--guidance_scale` must be a finite number, got inf"),
        (["--guidance_scale", "nan"], r"`--guidance_scale` must be a finite number, got nan"),
        (["--seed", "-1"], r"`--seed` must be in \[0, 9223372036854775807\], got -1"),
        (["--seed", str(2**64)], r"`--seed` must be in \[0, 9223372036854775807\], got 18446744073709551616"),
        (["--width", "128"], r"`--width` 128 was given without `--height`; pass both"),
        (["--height", "128"], r"`--height` 128 was given without `--width`; pass both"),
        (["--height", "100", "--width", "64"], r"`--height` must be a multiple of 8, got 100; e\.g\. 96"),
        (["--num_images_per_prompt", "0"], r"`--num_images_per_prompt` must be in \[1, 64\], got 0"),
        (["--scorers", "q16"], r"`--scorers q16` needs `--q16_prompts FILE`"),
        (["--scorers", "nudnet"], r"`--scorers` must be one of \['nudenet', 'q16', 'safety_checker'\], got 'nudnet'"),
        (["--thresholds", "nudenet=1.5", "--scorers", "nudenet"], r"`--thresholds` must be in \[0\.0, 1\.0\], got 1\.5"),
        (["--thresholds", "q16=0.5", "--scorers", "nudenet"], r"`--thresholds` sets \['q16'\], which `--scorers nudenet` does not run"),
        (["--thresholds", "safety_checker=0.5"], r"thresholds exist for \['nudenet', 'q16'\] only"),
        (["--nudenet_classes", "NOPE", "--scorers", "nudenet"], r"`--nudenet_classes` has unknown NudeNet classes \['NOPE'\]"),
        (["--safety_mode", "hide"], r"argument --safety_mode/--safety-mode: invalid choice: 'hide'"),
        (["--dtype", "float16", "--device", "cpu"], r"`--dtype float16` on the CPU"),
        (["--dtype", "half"], r"argument --dtype: invalid choice: 'half'"),
        (["--negative_prompt", "bad\0"], r"`--negative_prompt` 'bad\\x00' contains a NUL byte"),
    ],
)
def test_generate_bad_inputs_exit_2_before_any_model_loads(tmp_path, capsys, monkeypatch, extra, pattern):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr("safer_diffusion.tiny.tiny_pipeline_folders", no_loading)
    assert main(["generate", "a cat", "--tiny", "--output", str(tmp_path / "x.png"), *extra]) == 2
    err = capsys.readouterr().err
    assert re.search(pattern, err.strip().splitlines()[-1]), err  # one line (argparse's own errors follow its usage)
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "prompts, pattern",
    [
        ([""], r"`prompt` '' is empty; pass a text prompt"),
        (["   \t"], r"`prompt` ' \\t' is empty"),  # (the one-line error folds runs of spaces)
        (["a cat", " "], r"`prompt` 2 ' ' is empty"),
        (["a\0cat"], r"`prompt` 'a\\x00cat' contains a NUL byte; remove it"),
    ],
)
def test_generate_refuses_empty_and_nul_prompts(tmp_path, capsys, prompts, pattern):
    assert main(["generate", *prompts, "--tiny", "--output", str(tmp_path / "x.png")]) == 2
    assert re.search(pattern, capsys.readouterr().err)


def test_generate_checks_the_output_before_loading(tmp_path, capsys, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the output was checked")

    monkeypatch.setattr("safer_diffusion.tiny.tiny_pipeline_folders", no_loading)
    assert main(["generate", "a cat", "--tiny", "--output", str(tmp_path)]) == 2
    assert "`--output` " + repr(str(tmp_path)) + " is a directory; pass a file path" in capsys.readouterr().err
    assert main(["generate", "a cat", "--tiny", "--output", str(tmp_path / "x.jpg")]) == 2
    assert "x.jpg' must end in no suffix, '.png'; rename it" in capsys.readouterr().err

    def unwritable(folder):  # what a read-only folder does (permissions do not bind root, so it is simulated)
        raise PermissionError(errno.EACCES, "Permission denied", str(folder))

    monkeypatch.setattr("safer_diffusion.fileio.probe_writable_dir", unwritable)
    assert main(["generate", "a cat", "--tiny", "--output", str(tmp_path / "ro" / "x.png")]) == 2
    assert "is not a writable folder (Permission denied); pass a folder you can write to" in capsys.readouterr().err


def test_generate_device_cuda_without_gpu(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["generate", "a cat", "--tiny", "--output", str(tmp_path / "x.png"), "--device", "cuda"]) == 2
    assert "`--device` 'cuda': this machine has no CUDA GPU; use `--device cpu`" in capsys.readouterr().err


def test_disk_full_at_write_time_names_the_path_and_free_space(tmp_path, capsys, monkeypatch):
    from PIL import Image as PILImage

    calls = []

    def full(self, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) > 1:  # the first image fits, the second does not
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, fp, *args, **kwargs)

    original = PILImage.Image.save
    monkeypatch.setattr(PILImage.Image, "save", full)
    out = tmp_path / "full.png"
    argv = ["generate", "a cat", "--tiny", "--output", str(out), "--num_inference_steps", "1", "--num_images_per_prompt", "2"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"failed (OutputWriteError): `--output`: cannot write '{tmp_path / 'full_1.png'}': the disk is full (" in err
    assert "MiB free on its file system); the 1 image(s) written before are kept (" in err and "full_0.png" in err
    assert (tmp_path / "full_0.png").is_file() and not list(tmp_path.glob(".*.tmp"))


def test_stale_temporary_files_are_removed(tmp_path, capsys):
    stale = tmp_path / ".cat.png.tmp"
    stale.write_bytes(b"half a png")
    assert main(["generate", "a cat", "--tiny", "--output", str(tmp_path / "cat.png"), "--num_inference_steps", "1"]) == 0
    assert not stale.exists() and (tmp_path / "cat.png").is_file()


def test_subprocess_exit_codes_and_one_line_errors(tmp_path):
    ok = _subprocess("generate", "a cat", "--tiny", "--output", str(tmp_path / "cat.png"), "--num_inference_steps", "1")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout.splitlines()[-1])["path"] == str(tmp_path / "cat.png")
    bad = _subprocess("generate", "a cat", "--tiny", "--output", str(tmp_path / "x.png"), "--num_inference_steps", "100000")
    assert bad.returncode == 2 and "--num_inference_steps" in bad.stderr and "Traceback" not in bad.stderr
    old = _subprocess("generate", "a cat", "--tiny", "--out", str(tmp_path / "old.png"), "--steps", "2")
    missing = _subprocess("generate", "a cat", "--tiny")
    assert missing.returncode == 2 and "`--output` is required; pass `--output VALUE`" in missing.stderr
    assert old.returncode == 0 and "`--steps` is deprecated" in old.stderr and (tmp_path / "old.png").is_file()
    score_bad = _subprocess("score", str(tmp_path), "--scorers", "nudenet")
    assert score_bad.returncode == 2 and "is a directory, pass image files" in score_bad.stderr and "Traceback" not in score_bad.stderr


def test_score_json_lines(astronaut_png, tmp_path, capsys):
    rgba = tmp_path / "astronaut_rgba.png"
    Image.open(astronaut_png).convert("RGBA").save(rgba)
    assert main(["score", str(astronaut_png), str(rgba), "--scorers", "nudenet"]) == 0
    records = _lines(capsys)
    assert [r["flagged"] for r in records] == [False, False] and records[0]["scorer"] == "nudenet"
    assert main(["score", str(astronaut_png), "--nudenet_classes", "FACE_FEMALE", "--details"]) == 0
    [record] = _lines(capsys)
    assert record["flagged"] is True and record["score"] > 0.6
    assert record["details"]["class_scores"]["FACE_FEMALE"] == pytest.approx(record["score"])
    assert main(["score", str(astronaut_png), "--nudenet_classes", "FACE_FEMALE", "--thresholds", f"nudenet={min(1.0, record['score'] + 0.01)}"]) == 0
    assert _lines(capsys)[0]["flagged"] is False


def test_score_old_threshold_and_classes_spellings(astronaut_png, capsys, caplog):
    with caplog.at_level("WARNING"):
        assert main(["score", str(astronaut_png), "--classes", "FACE_FEMALE", "--threshold", "0.99", "--scorer", "nudenet"]) == 0
    assert json.loads(capsys.readouterr().out)["flagged"] is False  # 0.99 reached the NudeNet threshold
    assert "`--threshold 0.99` is deprecated" in caplog.text and "`--thresholds nudenet=0.99`" in caplog.text
    assert "`--classes` is deprecated" in caplog.text


def test_score_bad_inputs(astronaut_png, tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    assert main(["score", str(astronaut_png), str(text)]) == 2
    assert f"`IMAGE` '{text}' is not an image file PIL can read" in capsys.readouterr().err
    assert main(["score", str(tmp_path / "missing.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["score", str(tmp_path)]) == 2
    assert f"`IMAGE` '{tmp_path}' is a directory, pass image files" in capsys.readouterr().err
    assert main(["score", str(astronaut_png), "--nudenet_classes", "NOPE"]) == 2
    assert "unknown NudeNet classes ['NOPE']" in capsys.readouterr().err
    assert main(["score", str(astronaut_png), "--scorers", "nudnet"]) == 2
    assert "`--scorers` must be one of ['nudenet', 'q16', 'safety_checker'], got 'nudnet'" in capsys.readouterr().err
    assert main(["score", str(astronaut_png), "--threshold", "nan"]) == 2
    assert "`--threshold` must be a finite number, got nan" in capsys.readouterr().err


@pytest.mark.parametrize("command", sorted(cli.DELEGATED))
def test_delegated_subcommands_dispatch_lazily(monkeypatch, command):
    seen = {}
    fake = types.ModuleType(cli.DELEGATED[command])
    fake.main = lambda argv: seen.setdefault("argv", argv) and 7
    monkeypatch.setitem(sys.modules, cli.DELEGATED[command], fake)
    assert main([command, "--tiny", "--limit", "2"]) == 7
    assert seen["argv"] == ["--tiny", "--limit", "2"]


def test_configs_are_the_option_mechanisms():
    from safer_diffusion.options import parse_config

    cfg = parse_config(cli.GenerateConfig, ["a", "--output", "x.png", "--scorers", "nudenet,q16", "--q16_prompts", __file__],
                       prog="t")  # fmt: skip
    assert cfg.scorers == ["nudenet", "q16"]  # the old comma syntax still splits
    assert cfg.scorer_spec(cfg.scorers)["name"] == "any_of"
