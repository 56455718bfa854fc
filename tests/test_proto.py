"""The committed caffe_pb2.py is generated from the committed caffe.proto (no hand edits, no drift)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def serialized_descriptor(source: str) -> bytes:
    """The FileDescriptorProto bytes a generated module registers (independent of protoc's version banner)."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "AddSerializedFile":
            return ast.literal_eval(node.args[0])
    raise AssertionError("no AddSerializedFile call in the generated module")


def test_generated_module_matches_schema(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{ROOT}",
            f"--python_out={tmp_path}",
            str(ROOT / "int8conv" / "caffe" / "proto" / "caffe.proto"),
        ],
        check=True,
    )
    fresh = (tmp_path / "int8conv" / "caffe" / "proto" / "caffe_pb2.py").read_text()
    committed = (ROOT / "int8conv" / "caffe" / "proto" / "caffe_pb2.py").read_text()
    assert serialized_descriptor(fresh) == serialized_descriptor(committed)
