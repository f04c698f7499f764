"""The code checks that the README's test command runs with the tests: mypy strict on the
package, ruff on everything, and generated protobuf code up to date."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=env, check=False)


def test_mypy_strict_on_the_package() -> None:
    # The package `creditline` lives in server/ (pyproject package-dir): mypy needs to see
    # it under its own name, so it reads it through a link named creditline.
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "creditline").symlink_to(ROOT / "server")
        env = {**os.environ, "MYPYPATH": tmp}
        result = run(sys.executable, "-m", "mypy", "-p", "creditline", env=env)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_clean() -> None:
    result = run(sys.executable, "-m", "ruff", "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_generated_protobuf_code_is_up_to_date() -> None:
    result = run(sys.executable, "scripts/gen_proto.py", "--check")
    assert result.returncode == 0, result.stdout + result.stderr
