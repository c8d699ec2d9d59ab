"""Generates the Python gRPC stubs from the .proto files whenever the package is built or installed.

The stubs are written next to the .proto files (also for editable installs) and are never committed.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


def generate_stubs() -> None:
    from grpc_tools import protoc  # build-time dependency (pyproject build-system.requires)

    include = protoc._get_resource_file_name("grpc_tools", "_proto")
    protos = sorted(str(p.relative_to(HERE)) for p in (HERE / "glmvoice").rglob("*.proto"))
    args = [
        "protoc",
        f"-I{HERE}",
        f"-I{include}",
        f"--python_out={HERE}",
        f"--pyi_out={HERE}",
        f"--grpc_python_out={HERE}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed for {protos}")


class BuildPyWithStubs(build_py):
    def run(self) -> None:
        generate_stubs()
        super().run()


setup(cmdclass={"build_py": BuildPyWithStubs})
