"""Regenerate the checked-in gRPC stubs from protos/ (`make protos`; a test checks they are current).

protoc's virtual-path mapping (-Irecsys/serving/proto=protos/recsys/v1) names the file
recsys/serving/proto/ranking.proto, so the generated grpc module imports its messages as
`recsys.serving.proto.ranking_pb2` with no post-processing; the proto package stays `recsys.v1`.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO = Path("protos/recsys/v1/ranking.proto")
GENERATED = ("ranking_pb2.py", "ranking_pb2.pyi", "ranking_pb2_grpc.py")


def generate(out_dir: Path | str = ROOT) -> list[Path]:
    """Write the stubs under out_dir/recsys/serving/proto/ (needs grpcio-tools, a dev dependency)."""
    from importlib.resources import files

    from grpc_tools import protoc

    out_dir = Path(out_dir)
    (out_dir / "recsys/serving/proto").mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-Irecsys/serving/proto={ROOT / PROTO.parent}",
        f"-I{files('grpc_tools') / '_proto'}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--pyi_out={out_dir}",
        str(ROOT / PROTO),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {ROOT / PROTO}")
    return [out_dir / "recsys/serving/proto" / name for name in GENERATED]


if __name__ == "__main__":
    for path in generate(sys.argv[1] if len(sys.argv) > 1 else ROOT):
        print(path)
