"""The benchmarks speak the shared vocabulary (safer_diffusion.options): bad values exit 2 with one line, old spellings warn."""

import json

import pytest

from benchmarks import bench_pipeline, bench_targets, bench_train, run_all


@pytest.mark.parametrize(
    "module, argv, pattern",
    [
        (bench_pipeline, ["--num_inference_steps", "0"], "`--num_inference_steps` must be in [1, 1000], got 0"),
        (bench_pipeline, ["--height", "60"], "`--height` must be a multiple of 8, got 60"),
        (bench_pipeline, ["--dtype", "float64"], "argument --dtype: invalid choice: 'float64'"),
        (bench_targets, ["--n", "0"], "`--n` must be in [1, inf], got 0"),
        (bench_targets, ["--chunk_sizes", "512", "x"], "`--chunk_sizes`: not a whole number: 'x'"),
        (bench_train, ["--repeats", "0"], "`--repeats` must be in [1, inf], got 0"),
        (bench_train, ["--peak_tflops", "nan"], "`--peak_tflops` must be a finite number, got nan"),
        (bench_train, ["--no_such_flag"], "unrecognized arguments: --no_such_flag"),
        (run_all, ["--only", "bench_nope"], "argument --only: invalid choice: 'bench_nope'"),
    ],
)
def test_bad_values_exit_2_with_the_flag_named(module, argv, pattern, capsys):
    assert module.main(argv) == 2
    err = capsys.readouterr().err
    assert pattern in err.strip().splitlines()[-1] and "Traceback" not in err


def test_run_all_checks_its_output_before_running_anything(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(run_all, "run_one", lambda *a: pytest.fail("a benchmark ran before --output was checked"))
    assert run_all.main(["--output", str(tmp_path)]) == 2
    assert "is a directory; pass a file path" in capsys.readouterr().err


def test_run_all_passes_arguments_after_the_separator_and_writes_json(tmp_path, monkeypatch):
    seen = []

    def fake_run_one(name, extra):
        seen.append((name, extra))
        return {"benchmark": name, "returncode": 0, "wall_s": 0.0, "result": {"x_over_y": 1.0}}

    monkeypatch.setattr(run_all, "run_one", fake_run_one)
    out = tmp_path / "all.json"
    assert run_all.main(["--only", "bench_pipeline", "bench_train", "--out", str(out), "--", "--repeats", "1"]) == 0
    assert seen == [("bench_pipeline", ["--repeats", "1"]), ("bench_train", ["--repeats", "1"])]
    assert [r["benchmark"] for r in json.loads(out.read_text())] == ["bench_pipeline", "bench_train"]


def test_bench_targets_runs_small_with_the_old_comma_syntax(capsys, caplog):
    with caplog.at_level("WARNING"):
        assert bench_targets.main(["--n", "300", "--dim", "16", "--repeats", "1", "--chunk_sizes", "64,128", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["benchmark"] == "bench_targets" and set(result["chunks"]) == {"64", "128"} and result["chunk_invariant"]
    assert result["dtype"] == "float32" and "Comma-separated `--chunk_sizes` is deprecated" in caplog.text


def test_bench_train_padding_part_runs_tiny_and_trims(capsys):
    """Part padding at tiny size: trimmed batches carry fewer tokens than padded-to-77 ones, and the projection counts
    the paper recipe's curriculum steps (not pairs x epochs / batch)."""
    argv = ["--size", "tiny", "--device", "cpu", "--batch_size", "4", "--repeats", "1", "--warmup", "0", "--recipe_pairs", "1000",
            "--recipe_batch_size", "6", "--anchor_batch_size", "8"]
    assert bench_train.main(argv) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    for key in ("caption_tokens_mean", "caption_tokens_median", "caption_tokens_max", "trimmed_tokens_per_step", "pad77_tokens_per_step",
                "trimmed_steps_per_s", "pad77_steps_per_s", "trim_speedup_over_pad77", "projected_paper_recipe_min",
                "projected_train_min", "projected_anchors_min", "projected_targets_min", "anchor_captions_per_s"):
        assert isinstance(result[key], (int, float)) and result[key] > 0, key
    assert result["trimmed_tokens_per_step"] < result["pad77_tokens_per_step"] == 2 * 4 * 77
    # --group_by_length steps (one window of 50 steps of the same caption distribution) carry fewer tokens still
    assert result["grouped_tokens_per_step"] < result["trimmed_tokens_per_step"] and result["length_group_steps"] == 50
    assert result["projected_paper_recipe_grouped_min"] == pytest.approx(
        result["projected_grouped_train_min"] + result["projected_anchors_min"] + result["projected_targets_min"])
    assert result["caption_tokens_max"] <= 77 and 15 < result["caption_tokens_mean"] < 25
    # 1000 pairs, 50 held out, tertiles 317/316/317 joining at epochs 1, 2, 3; batch 48: 7 + 14 + 7 x 20 steps
    assert result["recipe_steps"] == 161 and result["recipe_steps_naive"] == 188 and result["recipe"]["finetune"] == "lora"
    assert result["projection_step_batch"] == 6 and result["anchor_batch_size"] == 8
    assert result["projected_paper_recipe_min"] == pytest.approx(
        result["projected_train_min"] + result["projected_anchors_min"] + result["projected_targets_min"])
    assert "trimmed / pad77:" in out and "steps 161 (epoch plan [7, 14, 20, 20, 20, 20, 20, 20, 20]" in out


def test_paper_recipe_projection_steps():
    """The text-only paper recipe (safer_clip_vit_l14.yaml: LoRA, batch 48, 9 epochs, tertiles) on 150k pairs."""
    cfg = bench_train.paper_recipe()
    assert (cfg.finetune, cfg.train_batch_size, cfg.num_train_epochs, cfg.curriculum) == ("lora", 48, 9, "tertiles")
    plan = bench_train.recipe_steps(cfg, 150_000)
    assert plan["train_pairs"] == 142_500 and plan["stage_sizes"] == [47_500] * 3
    assert plan["steps_per_epoch"] == [990, 1980] + [2969] * 7 and plan["steps"] == 23_753 and plan["steps_naive"] == 28_125


def test_realistic_captions_lengths():
    from safer_diffusion.tiny import clip_tokenizer

    caps = bench_train.realistic_captions(2000, mean_tokens=20.0, sigma=0.25, seed=0)
    lengths = [len(ids) for ids in clip_tokenizer()(caps, truncation=True, max_length=77).input_ids]
    assert abs(sum(lengths) / len(lengths) - 20.0) < 0.5 and max(lengths) <= 77
    assert bench_train.realistic_captions(5, seed=1) == bench_train.realistic_captions(5, seed=1)


def test_gpu_suite_grades_the_padding_and_projection_goals():
    from pathlib import Path

    suite = (Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.sh").read_text()
    assert 'TRAIN_ARGS=(--size vit-l14 --device cuda --batch_size 256' in suite
    assert '"trim_speedup_over_pad77": (">=", 2.5)' in suite and '"projected_paper_recipe_min": ("<=", 3.0)' in suite
    assert '"grouped_trim_speedup_over_pad77": (">=", 2.5)' in suite and '"projected_paper_recipe_grouped_min": ("<=", 3.0)' in suite


def test_run_all_runs_the_sdxl_pipeline_benchmark_at_its_cpu_size(monkeypatch):
    """`make bench` includes bench_pipeline at the tiny SDXL size; the arguments after `--` come after the run's own."""
    import subprocess

    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout='{"safe_over_vanilla": 1.0}\n')

    monkeypatch.setattr(run_all.subprocess, "run", fake_run)
    result = run_all.run_one("bench_pipeline_sdxl", ["--repeats", "1"])
    assert calls[0][1:] == ["-m", "benchmarks.bench_pipeline", "--size", "sdxl-tiny", "--repeats", "1"]
    assert result["result"] == {"safe_over_vanilla": 1.0} and "bench_pipeline_sdxl" in run_all.BENCHMARKS
