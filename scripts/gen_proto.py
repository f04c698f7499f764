"""Generates the protobuf and gRPC modules of server/creditline/v1/ from proto/ (the one command).

    python scripts/gen_proto.py          # regenerate server/creditline/v1/*_pb2*.py(i)
    python scripts/gen_proto.py --check  # exit 1 if server/creditline/v1/ is stale

Generated files are never edited by hand; CI runs --check.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
PACKAGE_PATH = Path("creditline") / "v1"
OUTPUT_DIR = ROOT / "server" / PACKAGE_PATH


def generate(into: Path) -> list[Path]:
    protos = sorted((PROTO_DIR / PACKAGE_PATH).glob("*.proto"))
    subprocess.run(
        [
            sys.executable, "-m", "grpc_tools.protoc",
            f"-I{PROTO_DIR}",
            f"--python_out={into}",
            f"--mypy_out={into}",
            f"--grpc_python_out={into}",
            f"--mypy_grpc_out={into}",
            *[str(p.relative_to(PROTO_DIR)) for p in protos],
        ],
        check=True,
    )
    return sorted((into / PACKAGE_PATH).glob("*_pb2*"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the code is stale")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        generated = generate(Path(tmp))
        if args.check:
            stale = [
                g.name for g in generated
                if not (OUTPUT_DIR / g.name).exists()
                or not filecmp.cmp(g, OUTPUT_DIR / g.name, shallow=False)
            ]
            if stale:
                print(f"generated protobuf code is stale: {', '.join(stale)}; "
                      "run: python scripts/gen_proto.py", file=sys.stderr)
                return 1
            print("generated protobuf code is up to date")
            return 0
        OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
        for old in OUTPUT_DIR.glob("*_pb2*"):
            old.unlink()
        for g in generated:
            shutil.copy(g, OUTPUT_DIR / g.name)
        init_text = '"""Generated protobuf code: see scripts/gen_proto.py."""\n'
        (OUTPUT_DIR / "__init__.py").write_text(init_text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
