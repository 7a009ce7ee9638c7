"""The README's top-level commands are contracts: the Make targets exist and expand to real commands,
the benchmark commands name real scripts and flags, and the offline snippet runs."""

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
