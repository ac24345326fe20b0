"""Regenerate the checked-in gRPC stubs from protos/ (`make protos`; a test checks they are current).

protoc runs with protos/ as its include root, so the descriptor's file name is the repository path
`recsys/v1/ranking.proto` (what reflection serves and what clients generating from protos/ expect);
the generated grpc module's import of `recsys.v1.ranking_pb2` is then rewritten to the package the
stubs live in, `recsys.serving.proto`. The proto package stays `recsys.v1`.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO = Path("recsys/v1/ranking.proto")  # relative to protos/
GENERATED = ("ranking_pb2.py", "ranking_pb2.pyi", "ranking_pb2_grpc.py")
_MODULE, _TARGET = "recsys.v1.ranking_pb2", "recsys.serving.proto.ranking_pb2"


def generate(out_dir: Path | str = ROOT) -> list[Path]:
    """Write the stubs under out_dir/recsys/serving/proto/ (needs grpcio-tools, a dev dependency)."""
    from importlib.resources import files

    from grpc_tools import protoc

    target = Path(out_dir) / "recsys/serving/proto"
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        args = [
            "grpc_tools.protoc",
            f"-I{ROOT / 'protos'}",
            f"-I{files('grpc_tools') / '_proto'}",
            f"--python_out={scratch}",
            f"--grpc_python_out={scratch}",
            f"--pyi_out={scratch}",
            str(ROOT / "protos" / PROTO),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {ROOT / 'protos' / PROTO}")
        for name in GENERATED:
            text = (Path(scratch) / PROTO.parent / name).read_text()
            text = text.replace("from recsys.v1 import ranking_pb2 as", "from recsys.serving.proto import ranking_pb2 as")
            (target / name).write_text(text.replace(f"'{_MODULE}'", f"'{_TARGET}'"))
    return [target / name for name in GENERATED]


if __name__ == "__main__":
    for path in generate(sys.argv[1] if len(sys.argv) > 1 else ROOT):
        print(path)
