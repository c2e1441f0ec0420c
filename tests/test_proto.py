"""The committed gRPC/protobuf code is what scripts/gen_proto.sh makes from proto/."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_generated_code_is_current(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    subprocess.run(["bash", "scripts/gen_proto.sh", str(tmp_path)], cwd=ROOT, env=env, check=True)
    for name in ("pipeline_pb2.py", "pipeline_pb2.pyi", "pipeline_pb2_grpc.py"):
        fresh = (tmp_path / "almapipe" / "v1" / name).read_text()
        committed = open(os.path.join(ROOT, "almapipe", "v1", name)).read()
        assert fresh == committed, f"{name} is stale: run scripts/gen_proto.sh"
