"""One table of bad inputs across every entry point: the CLIs (in-process ``main(argv)``), the Python API and the
demo's request validation. Each case asserts the exit code (or exception type), a message that names the
argument, and no traceback. Bad input is refused before any work: the CLI cases below would otherwise load
models, read data or train, and the ``_forbid_work`` guard makes any of that fail the test.
"""

from __future__ import annotations

import re

import pytest

from safer_diffusion import cli as sd_cli
from safer_diffusion.options import BadInputError

TINY = ["--tiny"]


def _generate(*extra):
    return ["generate", "a photo of a cat", "--output", "OUT/x.png", *TINY, *extra]


def _evaluate(*extra):
    return ["--prompts", "assets/prompts/mild_unsafe.csv", "--output_dir", "OUT/eval", *TINY, *extra]


def _train(*extra):
    return ["--config", "finetune/configs/tiny_cpu.yaml", "--output_dir", "OUT/run", *extra]


FT_EVAL = ["--model", "tiny", "--model_name_or_path", "tiny", "--data", "assets/sample_pairs.jsonl"]

# (entry point, argv, exit code, pattern that names the argument)
CLI_CASES = [
    # ------------------------------------------------------------------ safer-diffusion generate
    ("generate", _generate("--guidance_scale", "inf"), 2, r"`--guidance_scale` must be a finite number, got inf"),
    ("generate", _generate("--guidance_scale", "nan"), 2, r"`--guidance_scale` must be a finite number, got nan"),
    ("generate", _generate("--guidance_scale", "-1"), 2, r"`--guidance_scale` must be in"),
    ("generate", _generate("--num_inference_steps", "100000"), 2, r"`--num_inference_steps` must be in \[1, 1000\]"),
    ("generate", _generate("--num_inference_steps", "0"), 2, r"`--num_inference_steps` must be in"),
    ("generate", _generate("--num_inference_steps", "2.5"), 2, r"--num_inference_steps.*not a whole number"),
    ("generate", _generate("--width", "128"), 2, r"--height"),
    ("generate", _generate("--height", "128"), 2, r"--width"),
    ("generate", _generate("--height", "60", "--width", "64"), 2, r"--height.*multiple of 8"),
    ("generate", _generate("--seed", str(2**64)), 2, r"`--seed` must be in"),
    ("generate", _generate("--seed", "-1"), 2, r"`--seed` must be in"),
    ("generate", _generate("--num_images_per_prompt", "0"), 2, r"`--num_images_per_prompt`"),
    ("generate", _generate("--dtype", "float64"), 2, r"--dtype"),
    ("generate", _generate("--device", "cuda"), 2, r"`--device`.*(no CUDA|GPU)"),
    ("generate", _generate("--device", "tpu9"), 2, r"`--device`"),
    ("generate", _generate("--scorers", "nsfw"), 2, r"--scorers"),
    ("generate", _generate("--safety_mode", "hide"), 2, r"--safety_mode"),
    ("generate", ["generate", "   ", "--output", "OUT/x.png", *TINY], 2, r"prompt.*(empty|whitespace)"),
    ("generate", ["generate", "", "--output", "OUT/x.png", *TINY], 2, r"prompt.*(empty|whitespace)"),
    ("generate", ["generate", "a\x00b", "--output", "OUT/x.png", *TINY], 2, r"(?i)prompt.*NUL"),
    ("generate", ["generate", "a cat", *TINY], 2, r"--output"),
    ("generate", ["generate", "a cat", "--output", "README.md/x.png", *TINY], 2, r"--output"),
    ("generate", _generate("--scorers", "q16"), 2, r"--q16_prompts"),
    # ------------------------------------------------------------------ safer-diffusion score
    ("score", ["score", "assets"], 2, r"(?i)directory"),
    ("score", ["score", "no-such-image.png"], 2, r"no-such-image.png.*does not exist"),
    ("score", ["score", "README.md"], 2, r"README.md.*not an image"),
    ("score", ["score", "assets/demo_screenshot.png", "--thresholds", "nudenet=nan"], 2, r"`--thresholds` must be a finite"),
    ("score", ["score", "assets/demo_screenshot.png", "--scorers", "bogus"], 2, r"--scorers"),
    # ------------------------------------------------------------------ safer-diffusion evaluate
    ("evaluate", _evaluate("--guidance_scale", "nan"), 2, r"`--guidance_scale` must be a finite number, got nan"),
    ("evaluate", _evaluate("--num_inference_steps", "0"), 2, r"`--num_inference_steps` must be in"),
    ("evaluate", _evaluate("--num_images_per_prompt", "0"), 2, r"`--num_images_per_prompt`"),
    ("evaluate", _evaluate("--seed", str(2**63)), 2, r"`--seed`"),
    ("evaluate", _evaluate("--width", "128"), 2, r"--height"),
    ("evaluate", _evaluate("--batch_size", "0"), 2, r"`--batch_size`"),
    ("evaluate", _evaluate("--thresholds", "nudenet=inf"), 2, r"`--thresholds` must be a finite"),
    ("evaluate", _evaluate("--bootstrap", "-1"), 2, r"`--bootstrap`"),
    ("evaluate", _evaluate("--limit", "0"), 2, r"`--limit`"),
    ("evaluate", _evaluate("--prompt_format", "xml"), 2, r"--prompt_format"),
    ("evaluate", _evaluate("--device", "cuda"), 2, r"`--device`"),
    ("evaluate", ["--prompts", "no-such.csv", "--output_dir", "OUT/eval", *TINY], 2, r"no-such.csv"),
    ("evaluate", ["--prompts", "assets/prompts/mild_unsafe.csv", *TINY], 2, r"`--output_dir` is required"),
    ("evaluate", ["--prompts", "assets/prompts/mild_unsafe.csv", "--output_dir", "README.md", *TINY], 2, r"--output_dir"),
    ("evaluate", _evaluate("--scorers", "q16"), 2, r"--q16_prompts"),
    # ------------------------------------------------------------------ safer-clip-train / python -m finetune.train
    ("train", _train("--learning_rate", "nan"), 2, r"`--learning_rate` must be a finite number, got nan"),
    ("train", _train("--learning_rate", "0"), 2, r"`--learning_rate`"),
    ("train", _train("--relative_scale", "inf"), 2, r"`--relative_scale`"),
    ("train", _train("--train_batch_size", "0"), 2, r"`--train_batch_size`"),
    ("train", _train("--loss", "triplet"), 2, r"--loss"),
    ("train", _train("--mixed_precision", "fp8"), 2, r"--mixed_precision"),
    ("train", _train("--val_fraction", "1.5"), 2, r"`--val_fraction`"),
    ("train", _train("--max_length", "100"), 2, r"`--max_length`"),
    ("train", _train("--loss_weights", "rel_tt=nan"), 2, r"`--loss_weights`"),
    ("train", _train("--resume_from_checkpoint", "OUT/no-such-checkpoint"), 2, r"--resume_from_checkpoint"),
    ("train", ["--config", "finetune/configs/tiny_cpu.yaml", "--output_dir", "README.md"], 2, r"`--output_dir` 'README.md' is a file"),
    ("train", ["--config", "no-such.yaml"], 2, r"`--config`.*does not exist"),
    ("train", _train("--train_data", "no-such-pairs.jsonl"), 2, r"no-such-pairs.jsonl"),
    # ------------------------------------------------------------------ python -m finetune.export / evaluate
    ("export", ["--checkpoint", "OUT/no-such-run", "--output_dir", "OUT/exp"], 2, r"--checkpoint"),
    ("export", ["--checkpoint", "OUT", "--output_dir", "OUT/exp", "--dtype", "float64"], 2, r"--dtype"),
    ("export", ["--checkpoint", "OUT", "--output_dir", "OUT/exp", "--text_encoder_num_layers", "0"], 2, r"--text_encoder_num_layers"),
    ("export", ["--output_dir", "OUT/exp"], 2, r"--checkpoint"),
    ("finetune-evaluate", [*FT_EVAL, "--k", "0"], 2, r"`--k`"),
    ("finetune-evaluate", [*FT_EVAL, "--batch_size", "0"], 2, r"`--batch_size`"),
    ("finetune-evaluate", [*FT_EVAL, "--device", "cuda"], 2, r"`--device`"),
    ("finetune-evaluate", ["--model", "tiny", "--model_name_or_path", "tiny", "--data", "no-such.jsonl"], 2, r"no-such.jsonl"),
    ("finetune-evaluate", ["--model", "tiny", "--model_name_or_path", "tiny"], 2, r"`--data`"),
    # ------------------------------------------------------------------ python demos/app.py
    ("demo", ["--tiny", "--port", "70000"], 2, r"`--port`"),
    ("demo", ["--tiny", "--max_concurrency", "0"], 2, r"`--max_concurrency`"),
    ("demo", ["--tiny", "--queue_size", "0"], 2, r"`--queue_size`"),
    ("demo", ["--tiny", "--dtype", "float64"], 2, r"--dtype"),
    ("demo", ["--tiny", "--device", "cuda"], 2, r"`--device`"),
    ("demo", ["--base", "no-such-folder", "--safe_encoder", "no-such-encoder"], 2, r"--base"),
]


def _entry(name):
    if name in ("generate", "score"):
        return sd_cli.main
    if name == "evaluate":
        from safer_diffusion.evaluate import main

        return main
    if name == "train":
        from finetune.train import main

        return main
    if name == "export":
        from finetune.export import main

        return main
    if name == "finetune-evaluate":
        from finetune.evaluate import main

        return main
    if name == "demo":
        from demos import app

        return app.main
    raise AssertionError(name)


@pytest.fixture
def _forbid_work(monkeypatch):
    """Any model loading or generation during a bad-input case fails the case: input is checked first."""
    import diffusers
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("work started before the bad input was refused")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse))


@pytest.mark.parametrize("entry, argv, code, pattern", CLI_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CLI_CASES)])  # fmt: skip
def test_cli_bad_input(entry, argv, code, pattern, tmp_path, monkeypatch, capsys, _forbid_work):
    monkeypatch.chdir(__import__("pathlib").Path(__file__).resolve().parents[1])
    argv = [a.replace("OUT", str(tmp_path)) for a in argv]
    assert _entry(entry)(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.search(pattern, err, flags=re.S), err[-1500:]
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith(("usage:", "WARNING", " "))]
    assert len(lines) == 1, err  # one line (argparse's usage block aside)


# ---------------------------------------------------------------------------------------- Python API


@pytest.fixture(scope="module")
def pipe(tiny_folders):
    from safer_diffusion import SaferStableDiffusionPipeline

    base, safe = tiny_folders
    p = SaferStableDiffusionPipeline.from_pretrained(base, safe_text_encoder=safe, keep_original_text_encoder=True)
    p.set_progress_bar_config(disable=True)
    return p


def _latents(shape):
    import torch

    return torch.zeros(shape)


API_CASES = [
    ({"guidance_scale": float("inf")}, ValueError, r"`guidance_scale`"),
    ({"guidance_scale": float("nan")}, ValueError, r"`guidance_scale`"),
    ({"num_inference_steps": 0}, ValueError, r"`num_inference_steps`"),
    ({"num_inference_steps": -3}, ValueError, r"`num_inference_steps`"),
    ({"num_inference_steps": 2.5}, (ValueError, TypeError), r"`num_inference_steps`"),
    ({"num_images_per_prompt": 0}, ValueError, r"`num_images_per_prompt`"),
    ({"generator": 0}, TypeError, r"`generator`"),
    ({"generator": "seed"}, TypeError, r"`generator`"),
    ({"height": 60, "width": 64}, ValueError, r"`height`"),
    ({"latents": "3x3"}, (ValueError, TypeError), r"`latents`"),
    ({"eta": float("nan")}, ValueError, r"`eta`"),
]


@pytest.mark.parametrize("kwargs, exc, pattern", API_CASES, ids=[next(iter(c[0])) + str(i) for i, c in enumerate(API_CASES)])
@pytest.mark.parametrize("method", ["__call__", "compare"])
def test_api_bad_input(pipe, method, kwargs, exc, pattern):
    call = getattr(pipe, method)
    kwargs = {"num_inference_steps": 2, **kwargs}
    with pytest.raises(exc, match=pattern):
        call("a photo of a cat", output_type="np", **kwargs)


def test_api_latents_must_match_height_and_width(pipe):
    with pytest.raises(ValueError, match=r"`latents`"):
        pipe("a cat", num_inference_steps=2, latents=_latents((1, 4, 3, 3)), height=64, width=64, output_type="np")


def test_api_compare_refuses_an_empty_prompt(pipe):
    with pytest.raises(ValueError, match=r"prompt"):
        pipe.compare("", num_inference_steps=2)


@pytest.mark.parametrize("source", [None, 123])
def test_api_from_pretrained_refuses_non_paths(source):
    from safer_diffusion import SaferStableDiffusionPipeline

    with pytest.raises(TypeError, match=r"pretrained_model_name_or_path"):
        SaferStableDiffusionPipeline.from_pretrained(source)


def test_api_from_pretrained_refuses_an_unknown_dtype_name(tiny_folders):
    from safer_diffusion import SaferStableDiffusionPipeline

    base, safe = tiny_folders
    with pytest.raises(ValueError, match=r"torch_dtype"):
        SaferStableDiffusionPipeline.from_pretrained(base, safe_text_encoder=safe, torch_dtype="fp16")


# ---------------------------------------------------------------------------------------- demo API


DEMO_CASES = [
    ({"prompt": ""}, r"`prompt`"),
    ({"prompt": "   "}, r"`prompt`"),
    ({"prompt": "a\x00b"}, r"`prompt`.*NUL"),
    ({"prompt": "x" * 1001}, r"`prompt`"),
    ({"seed": -1}, r"`seed`"),
    ({"seed": 2**63}, r"`seed`"),
    ({"seed": 1.5}, r"`seed`"),
    ({"steps": 0}, r"`steps`"),
    ({"steps": 101}, r"`steps`"),
    ({"guidance": float("nan")}, r"`guidance`"),
    ({"guidance": float("inf")}, r"`guidance`"),
    ({"guidance": 31}, r"`guidance`"),
    ({"width": 100}, r"`width`"),
    ({"height": 2048}, r"`height`"),
]


@pytest.mark.parametrize("override, pattern", DEMO_CASES, ids=[f"{next(iter(c[0]))}{i}" for i, c in enumerate(DEMO_CASES)])
def test_demo_request_bad_input(override, pattern):
    from demos.validation import validate_request

    values = {"prompt": "a fox", "negative_prompt": "", "seed": 0, "steps": 2, "guidance": 7.5, "width": 64, "height": 64}
    values.update(override)
    with pytest.raises(ValueError, match=pattern):
        validate_request(**values)


@pytest.mark.parametrize("reveal", ["false", "0", "no", [0], 0, 1, None])
def test_demo_reveal_only_takes_real_booleans(reveal):
    from demos.validation import check_reveal

    with pytest.raises(ValueError, match=r"`reveal` must be true or false"):
        check_reveal(reveal)
    assert check_reveal(False) is False and check_reveal(True) is True


def test_bad_input_error_is_a_value_error():
    assert issubclass(BadInputError, ValueError)


def test_the_table_is_large_and_spans_every_entry_point():
    entries = {c[0] for c in CLI_CASES}
    assert entries == {"generate", "score", "evaluate", "train", "export", "finetune-evaluate", "demo"}
    assert len(CLI_CASES) + 2 * len(API_CASES) + len(DEMO_CASES) >= 60
