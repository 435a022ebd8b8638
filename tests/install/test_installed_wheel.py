"""Runs when installed: the wheel, installed non-editable into a fresh environment, works from any directory.

Migrations, report notebooks, shipped suites and the default personas are package data, so a container image (issue
"Deployment") has them without the source tree. Third-party dependencies come from the project's `.venv` (added to
the fresh environment's path, after its own site-packages), so the test builds and installs only our package.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.model]


def sh(*args: str | Path, cwd: Path, env: dict[str, str] | None = None, timeout: int = 300) -> str:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding our wheel (not editable); returns its bin/ folder."""
    tmp = tmp_path_factory.mktemp("wheel")
    # Build from a copy of the tracked files, so the build leaves nothing in the checkout.
    src = tmp / "src"
    files = sh("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=ROOT).split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes((ROOT / name).read_bytes())
    sh(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", tmp / "dist", src,
       cwd=tmp)  # fmt: skip
    (wheel,) = (tmp / "dist").glob("callbot_workbench-*.whl")
    env_dir = tmp / "env"
    sh(sys.executable, "-m", "venv", "--without-pip", env_dir, cwd=tmp)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(env_dir), "platbase": str(env_dir)}))
    # Dependencies from the project's venv, after the fresh env's own packages (our wheel comes first).
    (site / "callbot_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    sh(sys.executable, "-m", "pip", "--python", env_dir / "bin" / "python", "install", "--quiet", "--no-deps",
       "--no-index", wheel, cwd=tmp)  # fmt: skip
    return env_dir / "bin"


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CALLBOT_", "PYTHONPATH", "VIRTUAL_ENV"))}
    # The borrowed dependencies' data files (nbconvert's HTML templates) are in the project venv's share/jupyter;
    # installed normally they would be in the fresh environment's own.
    env["JUPYTER_PATH"] = str(Path(sys.prefix) / "share" / "jupyter")
    return {**env, **extra}


def test_the_installed_wheel_migrates_chats_and_reports_from_any_directory(installed: Path, tmp_path: Path) -> None:
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = clean_env()
    where = sh(installed / "python", "-c", "import callbot_core; print(callbot_core.__file__)", cwd=work, env=env)
    assert str(installed.parent) in where, f"callbot_core came from {where}, not the installed wheel"

    callbot = installed / "callbot"
    assert "up to date" in sh(callbot, "db", "upgrade", cwd=work, env=env)
    # Installed, relative paths mean the working directory: all runtime state lands under ./data/runtime.
    runtime = work / "data" / "runtime"
    assert (runtime / "callbot.db").is_file() and (runtime / "secret_key").is_file()

    out = sh(callbot, "chat", "--persona", "receptionist", "--message", "Hello, are you open today?", cwd=work,
             env=env)  # fmt: skip
    assert "receptionist@1" in out and "bot> " in out and "[TTFT" in out

    html = sh(callbot, "report", "run", "performance_report", cwd=work, env=env, timeout=600).strip().splitlines()[-1]
    assert Path(html).is_file() and Path(html).resolve().is_relative_to(runtime.resolve())
    assert "Performance" in Path(html).read_text(encoding="utf-8")

    suites = sh(installed / "python", "-c",
                "from callbot_core.experiments.evals import load_suite; print(load_suite('receptionist').name)",
                cwd=work, env=env)  # fmt: skip
    assert suites.strip()


def test_the_runtime_folder_setting_moves_all_state(installed: Path, tmp_path: Path) -> None:
    runtime = tmp_path / "state"
    env = clean_env(CALLBOT_RUNTIME_DIR=str(runtime))
    sh(installed / "callbot", "db", "upgrade", cwd=tmp_path, env=env)
    assert sorted(p.name for p in runtime.iterdir()) >= ["callbot.db", "secret_key"]
    assert not (tmp_path / "data").exists()
