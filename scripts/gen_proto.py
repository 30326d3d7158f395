"""Generate the Python protobuf and gRPC stubs in common/pb from proto/.

`make proto` runs this. `--check` regenerates into a temporary folder and
exits 1 when the committed stubs differ (tests/test_proto_fresh.py does the
same), so the committed code never drifts from the contract.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PACKAGE_DIR = PROTO_ROOT / "xeno" / "fl" / "v1"
OUT_DIR = ROOT / "common" / "pb"
# protoc writes `from xeno.fl.v1 import x_pb2`; our package is common.pb.
_IMPORT = re.compile(r"^from xeno\.fl\.v1 import ", re.MULTILINE)
_INIT = '"""Generated protobuf and gRPC stubs for proto/xeno/fl/v1 (run `make proto`)."""\n'


def generate(out_dir: Path) -> list[Path]:
    """Write the stubs for every .proto into out_dir; return the files written."""
    from grpc_tools import protoc  # dev dependency: only needed to regenerate

    protos = sorted(PACKAGE_DIR.glob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *[str(p) for p in protos],
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed; see the messages above")
        generated = Path(tmp) / "xeno" / "fl" / "v1"
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for src in sorted(generated.iterdir()):
            text = _IMPORT.sub("from common.pb import ", src.read_text())
            dst = out_dir / src.name
            dst.write_text(text)
            written.append(dst)
        init = out_dir / "__init__.py"
        init.write_text(_INIT)
        written.append(init)
    return written


def stale_files(committed: Path = OUT_DIR) -> list[str]:
    """Names of stub files that differ from a fresh generation (empty when fresh)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        stale = []
        for f in fresh:
            old = committed / f.name
            if not old.exists() or old.read_text() != f.read_text():
                stale.append(f.name)
        extra = {p.name for p in committed.glob("*_pb2*.py*")} - {f.name for f in fresh}
        return stale + sorted(extra)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="only report stale stubs")
    args = parser.parse_args()
    if args.check:
        stale = stale_files()
        if stale:
            print("stale generated stubs (run `make proto`): " + ", ".join(stale))
            return 1
        print("generated stubs are fresh")
        return 0
    for f in generate(OUT_DIR):
        print(f"wrote {f.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
