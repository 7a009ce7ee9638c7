"""The README's top-level commands are contracts: the Make targets exist and expand to real commands,
the benchmark commands name real scripts and flags, and the offline snippet runs."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _section(start: str, end: str) -> str:
    return README[README.index(start) : README.index(end)]


def _bash_lines(text: str) -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    lines = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #", 1)[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def test_quick_start_names_the_two_commands_first():
    quick = _section("## Quick start", "### Installation")
    first = _bash_lines(quick)[:2]
    assert first == ["make demo", "make test"]


@pytest.mark.parametrize("target", ["setup", "demo", "test", "lint", "bench", "smoke"])
def test_make_targets_expand(target):
    out = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()


def test_make_demo_is_offline_by_default_and_takes_real_models_on_request():
    default = subprocess.run(["make", "-n", "demo"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "demos/app.py --tiny" in default
    real = subprocess.run(["make", "-n", "demo", "DEMO_ARGS=--base CompVis/stable-diffusion-v1-4 --safe_encoder Adeely93/SafeR_CLIP"],
                          cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "--tiny" not in real and "--base CompVis/stable-diffusion-v1-4" in real


def test_make_test_runs_lint_then_pytest_offline():
    out = subprocess.run(["make", "-n", "test"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.index("ruff check") < out.index("HF_HUB_OFFLINE=1") < out.index("pytest")


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and "set -euo pipefail" in ci


def test_benchmark_commands_name_real_scripts_and_flags():
    lines = _bash_lines(_section("<!-- section:benchmarks -->", "<!-- /section:benchmarks -->"))
    assert lines
    for line in lines:
        argv = shlex.split(line)
        if argv[0] == "make":
            continue
        if argv[0] == "bash":
            script = ROOT / argv[1]
            assert script.is_file(), line
            subprocess.run(["bash", "-n", str(script)], check=True)
            continue
        if argv[:2] == ["python", "-m"]:
            module = argv[2]
            assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), line
            out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True)
            assert out.returncode == 0, out.stderr
            for flag in (a for a in argv[3:] if a.startswith("--")):
                assert flag in out.stdout, f"{flag} not in `{module} --help`"
            continue
        if argv[0] == "python":
            assert (ROOT / argv[1]).is_file(), line
            continue
        pytest.fail(f"unrecognised README benchmark command: {line}")


def test_offline_snippet_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFER_DIFFUSION_CACHE", str(tmp_path))
    code = re.search(r"## Offline use.*?```python\n(.*?)```", README, flags=re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README offline snippet", "exec"), namespace)
    base, safe = namespace["base_folder"], namespace["safe_clip_folder"]
    assert (base / "model_index.json").is_file() and (safe / "config.json").is_file()


def _help_command(argv: list[str]) -> list[str] | None:
    """The `--help` command of the entry point a README line runs, or None for lines that run no entry point."""
    if argv[0] == "safer-diffusion":
        return [sys.executable, "-m", "safer_diffusion", argv[1], "--help"]
    if argv[0] == "safer-clip-train":
        return [sys.executable, "-m", "finetune.train", "--help"]
    if "-m" in argv and argv[0] in ("python", "accelerate"):
        module = argv[argv.index("-m") + 1]
        if module in ("venv", "pytest"):
            return None
        return [sys.executable, "-m", module, "--help"]
    if argv[0] == "python" and argv[1].endswith(".py"):
        return [sys.executable, argv[1], "--help"]
    return None


def _flags_after_entry_point(argv: list[str]) -> list[str]:
    start = argv.index("-m") + 2 if "-m" in argv else (2 if argv[0] in ("python", "safer-diffusion") else 1)
    return [a.split("=", 1)[0] for a in argv[start:] if a.startswith("--")]


_HELP: dict[tuple[str, ...], str] = {}


def test_every_readme_command_uses_the_flags_its_help_shows():
    """One vocabulary: every flag a README command passes is the spelling its entry point's `--help` shows
    (so no kebab-case twin and no deprecated spelling), and every script it names exists."""
    checked = 0
    for line in _bash_lines(README):
        argv = shlex.split(line)
        if argv[0] in ("make", "pip", ".venv/bin/pytest", "python3") or argv[:2] == ["bash", ".ci/run"]:
            continue
        if argv[0] == "bash":
            assert (ROOT / argv[1]).is_file(), line
            continue
        help_cmd = _help_command(argv)
        assert help_cmd is not None, f"unrecognised README command: {line}"
        key = tuple(help_cmd[1:])
        if key not in _HELP:
            out = subprocess.run(help_cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            assert out.returncode == 0, f"{' '.join(help_cmd)}: {out.stderr[-500:]}"
            _HELP[key] = out.stdout
        shown = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_]*(?![\w-])", _HELP[key]))
        for flag in _flags_after_entry_point(argv):
            assert flag in shown, f"`{flag}` in `{line}` is not a flag `{' '.join(help_cmd[1:])}` shows"
        checked += 1
    assert checked >= 20


def test_readme_training_loop_runs_on_the_tiny_recipe(tmp_path):
    """The README's offline training commands, as written (outputs moved under tmp): train, export, evaluate."""
    section = _section("<!-- section:training -->", "<!-- /section:training -->")
    lines = [ln for ln in _bash_lines(section) if "tiny" in ln][:3]
    assert [shlex.split(ln)[2] for ln in lines] == ["finetune.train", "finetune.export", "finetune.evaluate"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for line in lines:
        argv = [a.replace("outputs/", f"{tmp_path}/outputs/").replace("exported/", f"{tmp_path}/exported/") for a in shlex.split(line)]
        proc = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, f"{line}\n{proc.stderr[-2000:]}"
    assert (tmp_path / "exported" / "tiny" / "text_encoder" / "model.safetensors").is_file()
    assert "redirect" in (tmp_path / "outputs" / "tiny" / "eval.json").read_text()
