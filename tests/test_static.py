"""The code checks that the README's test command runs with the tests: mypy strict on the
package, ruff on everything, and generated protobuf code up to date."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=env, check=False)


def test_mypy_strict_on_the_package() -> None:
    # pyproject's mypy_path (server/) is where the package lives, under its own name.
    result = run(sys.executable, "-m", "mypy", "-p", "creditline")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_clean() -> None:
    result = run(sys.executable, "-m", "ruff", "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_generated_protobuf_code_is_up_to_date() -> None:
    result = run(sys.executable, "scripts/gen_proto.py", "--check")
    assert result.returncode == 0, result.stdout + result.stderr


PACKAGE = ROOT / "server" / "creditline"
# What each package may not import: the dependencies point one way, api -> charging ->
# store, and only api speaks protobuf and gRPC.
FORBIDDEN_IMPORTS = {
    "charging": ("creditline.api", "creditline.v1", "creditline.store.store", "grpc", "redis"),
    "store": ("creditline.api", "creditline.v1", "creditline.charging", "grpc"),
    "events": ("creditline.api", "creditline.v1", "grpc"),
    "books": ("creditline.api", "creditline.v1", "grpc"),
    "observability": ("creditline.api", "creditline.v1"),
}


def imported_modules(source: Path) -> set[str]:
    tree = ast.parse(source.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_the_packages_import_in_one_direction() -> None:
    wrong = []
    for package, forbidden in FORBIDDEN_IMPORTS.items():
        for source in sorted((PACKAGE / package).rglob("*.py")):
            for name in sorted(imported_modules(source)):
                if any(name == f or name.startswith(f + ".") for f in forbidden):
                    wrong.append(f"{source.relative_to(ROOT)} imports {name}")
    assert not wrong, "\n".join(wrong)


def test_every_module_is_where_its_import_says() -> None:
    # the package is laid out as it is imported: no package-dir mapping but server/
    import creditline.store.store

    assert Path(creditline.store.store.__file__).resolve() == PACKAGE / "store" / "store.py"
