"""The shared config/CLI mechanism (safer_diffusion.options): spellings, lists, mappings, bounds, YAML, exit codes."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pytest

from safer_diffusion.options import (
    MISSING,
    BadInputError,
    build_parser,
    config_from_dict,
    dtype_option,
    option,
    parse_config,
    run_main,
)


@dataclass
class _Config:
    prompt: list[str] = option(MISSING, "Prompts.", positional=True)
    num_inference_steps: int = option(25, "Denoising steps.", bounds=(1, 1000), deprecated=("--steps",))
    guidance_scale: float = option(7.5, "Guidance.", bounds=(0, 100))
    scorers: list[str] = option([], "Scorers.", choices=("nudenet", "q16"), legacy_commas=True, deprecated=("--scorer",))
    thresholds: dict[str, float] = option({}, "Per-scorer thresholds.")
    dtype: str = dtype_option()
    height: int | None = option(None, "Height.")
    save_images: bool = option(False, "Save images.")
    progress: bool = option(True, "Progress bar.")


def _parse(argv):
    return parse_config(_Config, argv, prog="t")


def test_snake_and_kebab_spellings_are_the_same_flag():
    a = _parse(["p", "--num_inference_steps", "3", "--save_images"])
    b = _parse(["p", "--num-inference-steps", "3", "--save-images"])
    assert a == b and a.num_inference_steps == 3 and a.save_images is True


def test_help_shows_one_spelling(capsys):
    text = build_parser(_Config, prog="t").format_help()
    assert "--num_inference_steps" in text and "--num-inference-steps" not in text
    assert "--steps" not in text  # deprecated spellings are hidden


def test_lists_mappings_booleans_optional():
    cfg = _parse(["a", "b", "--scorers", "nudenet", "q16", "--thresholds", "nudenet=0.45", "q16=0.5", "--no_progress",
                  "--height", "none"])  # fmt: skip
    assert cfg.prompt == ["a", "b"]
    assert cfg.scorers == ["nudenet", "q16"]
    assert cfg.thresholds == {"nudenet": 0.45, "q16": 0.5}
    assert cfg.progress is False and cfg.height is None


def test_deprecated_spellings_work_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        cfg = _parse(["p", "--steps", "4", "--scorer", "nudenet,q16", "--dtype", "fp16"])
    assert cfg.num_inference_steps == 4 and cfg.scorers == ["nudenet", "q16"] and cfg.dtype == "float16"
    text = caplog.text
    assert "`--steps` is deprecated" in text and "--num_inference_steps" in text
    assert "Comma-separated `--scorers`" in text and "fp16" in text


@pytest.mark.parametrize(
    "argv, pattern",
    [
        (["p", "--guidance_scale", "nan"], r"`--guidance_scale` must be a finite number, got nan"),
        (["p", "--guidance_scale", "inf"], r"`--guidance_scale` must be a finite number"),
        (["p", "--num_inference_steps", "0"], r"`--num_inference_steps` must be in \[1, 1000\], got 0"),
        (["p", "--num_inference_steps", "100000"], r"`--num_inference_steps` must be in \[1, 1000\]"),
        (["p", "--thresholds", "nudenet=inf"], r"`--thresholds` must be a finite number"),
    ],
)
def test_bad_values_raise_bad_input(argv, pattern):
    with pytest.raises(BadInputError, match=pattern):
        _parse(argv)


@pytest.mark.parametrize(
    "argv, pattern",
    [(["p", "--dtype", "float64"], "--dtype"), (["p", "--num_inference_steps", "2.5"], "not a whole number"),
     (["--height", "3"], "prompt"), (["p", "--scorers", "nsfw"], "--scorers")],  # fmt: skip
)
def test_usage_errors_exit_2_with_one_message(argv, pattern, capsys):
    assert run_main(lambda: _parse(argv), prog="t") == 2
    err = capsys.readouterr().err
    assert pattern in err and "Traceback" not in err


def test_run_main_codes(capsys):
    assert run_main(lambda: None, prog="t") == 0
    assert run_main(lambda: _parse(["p", "--guidance_scale", "nan"]), prog="t") == 2
    assert "t: error: `--guidance_scale` must be a finite number, got nan." in capsys.readouterr().err

    def boom():
        raise RuntimeError("CUDA out of memory\nmore lines")

    assert run_main(boom, prog="t") == 1
    err = capsys.readouterr().err
    assert err.strip() == "t: failed (RuntimeError): CUDA out of memory more lines"
    assert run_main(lambda: _parse(["--help"]), prog="t") == 0


def test_yaml_config_precedence(tmp_path):
    @dataclass
    class WithFile:
        learning_rate: float = option(1e-4, "LR.", bounds=(0, None))
        seed: int = option(0, "Seed.")

    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 3e-4\nseed: 5\n")
    cfg = parse_config(WithFile, ["--config", str(path), "--seed", "7"], prog="t", config_file=True)
    assert cfg.learning_rate == pytest.approx(3e-4) and cfg.seed == 7
    path.write_text("learning_rate: .nan\n")
    with pytest.raises(BadInputError, match="`--learning_rate` must be a finite number"):
        parse_config(WithFile, ["--config", str(path)], prog="t", config_file=True)
    path.write_text("learn_rate: 1\n")
    with pytest.raises(BadInputError, match=r"unknown option\(s\) \['learn_rate'\]"):
        parse_config(WithFile, ["--config", str(path)], prog="t", config_file=True)
    with pytest.raises(BadInputError, match="does not exist"):
        parse_config(WithFile, ["--config", str(tmp_path / "none.yaml")], prog="t", config_file=True)


def test_config_from_dict_checks_like_the_command_line():
    assert config_from_dict(_Config, {"prompt": ["x"], "num_inference_steps": "5"}).num_inference_steps == 5
    with pytest.raises(BadInputError, match="`--prompt` is required"):
        config_from_dict(_Config, {})
    with pytest.raises(BadInputError, match=r"Unknown option\(s\) \['steps'\]"):
        config_from_dict(_Config, {"prompt": ["x"], "steps": 3})


def test_a_required_flag_may_be_given_by_its_old_spelling(caplog):
    @dataclass
    class Out:
        output_dir: str = option(MISSING, "Folder.", deprecated=("--out",))

    assert parse_config(Out, ["--out", "d"], prog="t").output_dir == "d"
    assert parse_config(Out, ["--output_dir", "e"], prog="t").output_dir == "e"
    with pytest.raises(BadInputError, match="`--output_dir` is required"):
        parse_config(Out, [], prog="t")
