"""Build hook: generate the admin API's Python code from protos/ with grpcio-tools.

The generated modules (sidecar/admin/api/admin_pb2*.py) are not committed: they are
produced from protos/graysteer/admin/v1/admin.proto on every build and editable
install, so the .proto file is the only source of truth and the generated code always
matches the pinned grpcio-tools (see pyproject.toml's build-system requirements).
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent.resolve()
PROTO_DIR = ROOT / "protos" / "graysteer" / "admin" / "v1"
PACKAGE_DIR = "sidecar/admin/api"  # where the generated modules live, as an import path


def generate_admin_api() -> None:
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PACKAGE_DIR}={PROTO_DIR}",  # import path sidecar/admin/api/admin.proto
        f"-I{well_known}",
        f"--python_out={ROOT}",
        f"--grpc_python_out={ROOT}",
        f"{PACKAGE_DIR}/admin.proto",
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO_DIR / 'admin.proto'}")


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        generate_admin_api()
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
