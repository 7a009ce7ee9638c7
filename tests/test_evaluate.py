"""`safer-diffusion evaluate`: options and their validation, sharding, seeds and batching (no model is loaded here)."""

import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from safer_diffusion.evaluation.cli import main
from safer_diffusion.evaluation.config import MAX_SEED, EvaluateConfig, build_parser, config_from_args
from safer_diffusion.evaluation.generate import initial_latents
from safer_diffusion.evaluation.plan import WorkItem, make_batches, make_work_items, shard
from safer_diffusion.evaluation.prompts import load_prompts
from safer_diffusion.options import BadInputError, config_from_dict

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "evaluation"
MILD = ROOT / "assets" / "prompts" / "mild_unsafe.csv"
MIRROR = ["illegal activity", "self-harm", "shocking", "violence"]


def _argv(tmp_path, *extra, prompts=MILD):
    return ["--tiny", "--prompts", str(prompts), "--output_dir", str(tmp_path / "out"), *extra]


def test_valid_arguments_build_a_config(tmp_path):
    cfg = config_from_args(_argv(tmp_path, "--compare_original", "--scorers", "nudenet", "--thresholds", "nudenet=0.45",
                                 "--categories", "violence", "shocking", "--limit", "3", "--num_images_per_prompt", "2"))
    assert cfg.variants == ("original", "safe")
    assert cfg.thresholds == {"nudenet": 0.45} and cfg.categories == ["violence", "shocking"] and cfg.limit == 3
    assert (tmp_path / "out").is_dir()
    assert config_from_args(_argv(tmp_path)).variants == ("safe",)
    # kebab-case is the same flag; dict configs get the same checks
    assert config_from_args(_argv(tmp_path, "--num-images-per-prompt", "2")).num_images_per_prompt == 2
    assert config_from_dict(EvaluateConfig, {"prompts": str(MILD), "output_dir": str(tmp_path / "d"), "tiny": True}).seed == 0


def test_yaml_config_file_sets_options_and_flags_override(tmp_path):
    path = tmp_path / "eval.yaml"
    path.write_text(f"prompts: {MILD}\ntiny: true\nnum_images_per_prompt: 3\nscorers: [nudenet]\nthresholds: {{nudenet: 0.5}}\n"
                    f"output_dir: {tmp_path / 'y'}\n")  # fmt: skip
    cfg = config_from_args(["--config", str(path), "--num_images_per_prompt", "2"])
    assert (cfg.num_images_per_prompt, cfg.thresholds, cfg.tiny, cfg.output_dir) == (2, {"nudenet": 0.5}, True, str(tmp_path / "y"))
    path.write_text(f"prompts: {MILD}\ntiny: true\nguidance_scale: .nan\noutput_dir: {tmp_path / 'y'}\n")
    with pytest.raises(BadInputError, match=r"^`--guidance_scale` must be a finite number, got nan\.$"):
        config_from_args(["--config", str(path)])


def test_defaults_are_defined_once():
    from safer_diffusion.options import DEFAULT_BASE_MODEL, DEFAULT_CLIP_MODEL, DEFAULT_SAFE_ENCODER

    cfg = EvaluateConfig(prompts="p", output_dir="o")
    assert (cfg.base, cfg.safe_encoder, cfg.q16_clip_model) == (DEFAULT_BASE_MODEL, DEFAULT_SAFE_ENCODER, DEFAULT_CLIP_MODEL)
    assert (cfg.dtype, cfg.device, cfg.scorers, cfg.num_inference_steps, cfg.guidance_scale) == ("auto", "auto", ["nudenet"], 50, 7.5)
    import inspect

    from safer_diffusion.scoring import SafetyCheckerScorer
    from safer_diffusion.scoring.safety_checker import DEFAULT_SAFETY_CHECKER

    assert cfg.safety_checker == DEFAULT_SAFETY_CHECKER == "CompVis/stable-diffusion-safety-checker"
    assert inspect.signature(SafetyCheckerScorer).parameters["safety_checker"].default is DEFAULT_SAFETY_CHECKER
    import safer_diffusion.evaluation.config as config_module

    for gone in ("_DTYPES", "_split_list", "_parse_thresholds", "_resolve_dtype", "DEFAULT_BASE"):
        assert not hasattr(config_module, gone)


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--num_images_per_prompt", "0"], r"^`--num_images_per_prompt` must be in \[1, inf\], got 0\.$"),
        (["--num_images_per_prompt", "-2"], r"^`--num_images_per_prompt` must be in \[1, inf\], got -2\.$"),
        (["--batch_size", "0"], r"^`--batch_size` must be in \[1, inf\], got 0\.$"),
        (["--num_inference_steps", "0"], r"^`--num_inference_steps` must be in \[1, 1000\], got 0\.$"),
        (["--num_inference_steps", "100000"], r"^`--num_inference_steps` must be in \[1, 1000\], got 100000\.$"),
        (["--limit", "0"], r"^`--limit` must be in \[1, inf\], got 0\.$"),
        (["--height", "100", "--width", "64"], r"^`--height` must be a positive multiple of 8, got 100\.$"),
        (["--width", "128"], r"^`--width` was given without `--height`; pass both \(e\.g\. `--height 512 --width 512`\) or neither"),
        (["--height", "128"], r"^`--height` was given without `--width`"),
        (["--bootstrap", "-1"], r"^`--bootstrap` must be in \[0, inf\], got -1\.$"),
        (["--seed", "-1"], rf"^`--seed` must be in \[0, {MAX_SEED}\], got -1\.$"),
        (["--seed", str(2**64)], rf"^`--seed` must be in \[0, {MAX_SEED}\], got {2**64}\.$"),
        (["--seed", str(MAX_SEED), "--num_images_per_prompt", "2"],
         rf"^`--seed` {MAX_SEED} \+ `--num_images_per_prompt` 2 - 1 exceeds {MAX_SEED} \(image i uses seed SEED \+ i\); lower `--seed`\.$"),
        (["--guidance_scale", "nan"], r"^`--guidance_scale` must be a finite number, got nan\.$"),
        (["--guidance_scale", "inf"], r"^`--guidance_scale` must be a finite number, got inf\.$"),
        (["--guidance_scale", "-1"], r"^`--guidance_scale` must be in \[0\.0, 100\.0\], got -1\.0\.$"),
        (["--scorers", "nudenet", "nsfw_detector"], r"^`--scorers` must be one of \['nudenet', 'q16', 'safety_checker'\], got 'nsfw_detector'\.$"),
        (["--scorers", "nudenet,nsfw_detector"], r"^`--scorers` must be one of \['nudenet', 'q16', 'safety_checker'\], got 'nsfw_detector'\.$"),
        (["--scorers"], r"^`--scorers` is empty; pass some of \['nudenet', 'q16', 'safety_checker'\], e\.g\. `--scorers nudenet`\.$"),
        (["--scorers", "q16"], r"q16, which needs `--q16_prompts PATH`"),
        (["--thresholds", "q16=0.5"], r"^`--thresholds`: 'q16' is not one of the `--scorers` \['nudenet'\]\.$"),
        (["--thresholds", "nudenet=1.5"], r"^`--thresholds` must be in \[0, 1\], got 1\.5\.$"),
        (["--thresholds", "nudenet=nan"], r"^`--thresholds` must be a finite number, got nan\.$"),
        (["--scorers", "nudenet", "safety_checker", "--thresholds", "safety_checker=0.5"],
         r"^`--thresholds`: the 'safety_checker' scorer has no threshold; thresholds apply to \['nudenet', 'q16'\]\.$"),
        (["--nudenet_classes", "NOPE"], r"^`--nudenet_classes` must be one of \['FEMALE_GENITALIA_COVERED', .*got 'NOPE'\.$"),
        (["--scorers", "safety_checker", "--nudenet_classes", "FACE_MALE"], r"`--nudenet_classes` is set but `--scorers` \['safety_checker'\] has no nudenet"),
        (["--base", "some/model"], r"^`--tiny` builds its own tiny models; drop `--base`/`--safe_encoder`"),
        (["--categories", "violence,sexual"], r"^`--categories`: \['sexual'\] not found.*present are \['illegal activity', 'self-harm', 'shocking', 'violence'\]"),
        (["--prompt_format", "i2p", "--prompt_column", "nope"], r"^`--prompt_column`='nope' is not a column of"),
    ],
)
def test_bad_arguments(tmp_path, extra, match):
    with pytest.raises(BadInputError, match=match):
        config_from_args(_argv(tmp_path, *extra))
    assert not (tmp_path / "out").exists()  # checked before the output folder is touched


def test_q16_prompts_must_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^`--q16_prompts`='.*missing\.npy' is not a file; pass the Q16 prompt embeddings file\.$"):
        config_from_args(_argv(tmp_path, "--scorers", "q16", "--q16_prompts", str(tmp_path / "missing.npy")))


def test_bad_prompt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"`--prompts`=.*missing.csv' does not exist"):
        config_from_args(_argv(tmp_path, prompts=tmp_path / "missing.csv"))
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(BadInputError, match=r"`--prompts`=.*empty.csv' is empty"):
        config_from_args(_argv(tmp_path, prompts=empty))
    with pytest.raises(BadInputError, match=r"no recognised prompt column: its columns are \['description', 'label'\]"):
        config_from_args(_argv(tmp_path, prompts=FIXTURES / "no_prompt_column.csv"))


@pytest.mark.parametrize(
    ("row", "match"),
    [
        ("a cat,100,64,7.5,1", r"prompt '0' has sd_image_width 100, not a positive multiple of 8; fix the file or drop `--use_prompt_settings`\.$"),
        ("a cat,64,64,inf,1", r"prompt '0' has sd_guidance_scale inf; it must be a finite number in \[0, 100\]; fix the file"),
        ("a cat,64,64,250,1", r"prompt '0' has sd_guidance_scale 250\.0; it must be a finite number in \[0, 100\]"),
        ("a cat,64,64,7.5,-5", rf"prompt '0' has sd_seed -5; seeds sd_seed \+ i must be in \[0, {MAX_SEED}\]"),
    ],
)
def test_use_prompt_settings_checks_every_prompt_before_any_work(tmp_path, row, match):
    bad = tmp_path / "bad.csv"
    bad.write_text(f"prompt,sd_image_width,sd_image_height,sd_guidance_scale,sd_seed\n{row}\n")
    with pytest.raises(BadInputError, match=rf"^`--prompts`='.*bad\.csv': {match}"):
        config_from_args(_argv(tmp_path, "--use_prompt_settings", prompts=bad))
    config_from_args(_argv(tmp_path, prompts=bad))  # without the flag the row's values are not used


def test_unwritable_output_dir(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(BadInputError, match=r"^`--output_dir` '.*a_file/out' cannot be created: '.*a_file' is a file; pass another folder\.$"):
        config_from_args(["--tiny", "--prompts", str(MILD), "--output_dir", str(blocker / "out")])
    with pytest.raises(BadInputError, match=r"^`--output_dir` is required; pass `--output_dir DIR`"):
        config_from_args(["--tiny", "--prompts", str(MILD)])


def test_main_reports_bad_input_on_one_line_with_status_2(tmp_path, capsys):
    assert main(_argv(tmp_path, "--num_images_per_prompt", "0")) == 2
    err = capsys.readouterr().err
    assert err == "safer-diffusion evaluate: error: `--num_images_per_prompt` must be in [1, inf], got 0.\n"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--thresholds", "nudenet"], r"argument --thresholds: 'nudenet' is not KEY=VALUE \(e\.g\. --thresholds nudenet=0\.6\)"),
        (["--thresholds", "nudenet=high"], r"argument --thresholds: not a number: 'high'"),
        (["--num_inference_steps", "2.5"], r"argument --num_inference_steps(/--num-inference-steps)?: not a whole number: '2\.5'"),
        (["--dtype", "float64"], r"argument --dtype: invalid choice: 'float64'"),
        (["--prompt_format", "xml"], r"argument --prompt_format(/--prompt-format)?: invalid choice: 'xml'"),
    ],
)
def test_usage_errors_exit_2_with_one_message(tmp_path, capsys, extra, message):
    assert main(_argv(tmp_path, *extra)) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err


def test_device_without_a_gpu_is_refused_before_any_work(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(_argv(tmp_path, "--device", "cuda", "--no_progress")) == 2
    assert "`--device` 'cuda': this machine has no CUDA GPU; use `--device cpu` (or auto)." in capsys.readouterr().err
    assert list((tmp_path / "out").iterdir()) == []  # no settings, no rows


def test_module_help_shows_the_canonical_vocabulary():
    proc = subprocess.run([sys.executable, "-m", "safer_diffusion.evaluate", "--help"], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    for flag in ("--prompts", "--compare_original", "--num_images_per_prompt", "--use_prompt_settings", "--scorers", "--thresholds",
                 "--nudenet_classes", "--save_images", "--tiny", "--batch_size", "--negative_prompt", "--output_dir", "--device",
                 "--dtype", "--no_progress", "--repair_settings", "--verbose"):
        assert flag in proc.stdout, flag
    for old in ("--out ", "--images-per-prompt", "--compare-original"):
        assert old not in proc.stdout  # deprecated and kebab spellings are accepted, not shown


def test_readme_style_old_spellings_still_parse(caplog):
    with caplog.at_level(logging.WARNING):
        args = build_parser().parse_args(["--prompts", "p.csv", "--out", "o", "--images-per-prompt", "2", "--compare",
                                          "--num-inference-steps", "3", "--no-progress"])
    assert (args.output_dir, args.num_images_per_prompt, args.compare_original, args.num_inference_steps, args.progress) == \
        ("o", 2, True, 3, False)
    assert "`--out` is deprecated and will be removed in the next release; use `--output_dir`." in caplog.text
    assert "`--images-per-prompt` is deprecated" in caplog.text and "`--compare` is deprecated" in caplog.text


# ---- sharding, seeds, batching ------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2, 3, 7])
def test_shards_partition_the_prompts(world_size):
    records = load_prompts(MILD)
    shards = [shard(records, r, world_size) for r in range(world_size)]
    ids = [p.prompt_id for s in shards for p in s]
    assert sorted(ids, key=int) == [r.prompt_id for r in records]  # every prompt exactly once
    assert max(map(len, shards)) - min(map(len, shards)) <= 1  # balanced
    with pytest.raises(ValueError, match="`rank` must be in"):
        shard(records, world_size, world_size)


def test_work_items_seeds_and_resume_skips(tmp_path):
    cfg = config_from_args(_argv(tmp_path, "--compare_original", "--num_images_per_prompt", "3", "--seed", "10", "--limit", "2"))
    records = load_prompts(MILD, limit=2)
    items, skipped = make_work_items(records, cfg, 64, 64, done=set())
    assert skipped == 0 and len(items) == 6
    assert [(it.record.prompt_id, it.seed) for it in items] == [("0", 10), ("0", 11), ("0", 12), ("1", 10), ("1", 11), ("1", 12)]
    assert all(it.variants == ("original", "safe") and (it.height, it.width, it.guidance_scale) == (64, 64, 7.5) for it in items)
    done = {("0", 10, "original"), ("0", 10, "safe"), ("0", 11, "safe")}
    items, skipped = make_work_items(records, cfg, 64, 64, done=done)
    assert skipped == 1
    assert [(it.record.prompt_id, it.seed, it.variants) for it in items][:2] == [("0", 11, ("original",)), ("0", 12, ("original", "safe"))]


def test_work_items_use_prompt_settings(tmp_path):
    records = load_prompts(FIXTURES / "i2p_sample.csv", limit=2)
    cfg = config_from_args(_argv(tmp_path, "--use_prompt_settings", "--num_images_per_prompt", "2", prompts=FIXTURES / "i2p_sample.csv"))
    items, _ = make_work_items(records, cfg, 64, 64, done=set())
    assert [(it.seed, it.guidance_scale, it.width, it.height) for it in items] == [
        (1234, 7.0, 32, 32), (1235, 7.0, 32, 32), (42, 9.5, 40, 32), (43, 9.5, 40, 32)]
    batches = make_batches(items, batch_size=4)  # different guidance/size never share a batch
    assert [[it.seed for it in b] for b in batches] == [[1234, 1235], [42, 43]]
    bad = tmp_path / "bad.csv"  # the library path checks the rows too (no config_from_args here)
    bad.write_text("prompt,sd_image_width,sd_image_height\na cat,100,64\n")
    with pytest.raises(BadInputError, match=r"prompt '0' has sd_image_width 100, not a positive multiple of 8"):
        make_work_items(load_prompts(bad), EvaluateConfig(prompts=str(bad), output_dir="o", use_prompt_settings=True), 64, 64, set())


def test_batches_respect_batch_size_and_order(tmp_path):
    cfg = config_from_args(_argv(tmp_path, "--num_images_per_prompt", "5", "--limit", "1"))
    items, _ = make_work_items(load_prompts(MILD, limit=1), cfg, 64, 64, done=set())
    assert [[it.seed for it in b] for b in make_batches(items, 2)] == [[0, 1], [2, 3], [4]]


def test_initial_latents_do_not_depend_on_the_batch():
    import torch

    class _Pipe:  # the two attributes initial_latents reads
        class unet:
            class config:
                in_channels = 4

        vae_scale_factor = 8

    rec = load_prompts(MILD, limit=1)[0]
    items = [WorkItem(rec, i, 100 + i, 7.5, 64, 64, ("safe",)) for i in range(3)]
    together = initial_latents(_Pipe, items, torch.float32, "cpu")
    alone = torch.cat([initial_latents(_Pipe, [it], torch.float32, "cpu") for it in items])
    assert together.shape == (3, 4, 8, 8)
    assert torch.equal(together, alone)
    assert not torch.equal(together[0], together[1])
    assert torch.equal(together[0], torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(100)))


def test_importing_the_package_is_light():
    code = ("import sys, safer_diffusion.evaluate, safer_diffusion.evaluation.cli, safer_diffusion.evaluation.run; "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'numpy', 'accelerate') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
