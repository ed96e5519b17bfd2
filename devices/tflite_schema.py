"""Reading and writing .tflite flatbuffers through the schema bundled with ai-edge-litert.

``ai_edge_litert.schema_py_generated`` is the flatbuffers object API TensorFlow generates from
``schema.fbs`` (the same code as ``tensorflow.lite.python.schema_py_generated``): it unpacks a
whole model into Python objects and packs it back. Checked alternatives: the ``tflite`` package
on PyPI only reads; writing with ``flatbuffers`` by hand would duplicate the generated code.
The import is inside the functions, so this module costs nothing until a .tflite is touched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

FILE_IDENTIFIER = b"TFL3"


def _schema() -> Any:
    try:
        from ai_edge_litert import schema_py_generated
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("reading .tflite needs ai-edge-litert (pip install ai-edge-litert)") \
            from err
    return schema_py_generated


def load_model(path_or_bytes: str | Path | bytes) -> Any:
    """The ``ModelT`` object tree of a .tflite file (a path or its bytes).

    Raises:
        ValueError: not a TFLite flatbuffer, or weights stored after the flatbuffer (offset
            buffers, used by models over 2 GB), which a re-pack would not carry along.
    """
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    if data[4:8] != FILE_IDENTIFIER:
        raise ValueError("not a TFLite flatbuffer (file identifier is not 'TFL3')")
    schema = _schema()
    model = schema.ModelT.InitFromPackedBuf(bytearray(data), 0)
    if any((b.offset or 0) > 1 for b in model.buffers or []):
        raise ValueError("TFLite models with offset buffers (weights after the flatbuffer) "
                         "are not supported")
    return model


def save_model(model: Any) -> bytes:
    """Pack a ``ModelT`` back into .tflite bytes with the ``TFL3`` identifier."""
    import flatbuffers

    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=FILE_IDENTIFIER)
    return bytes(builder.Output())


def opcode_names(model: Any) -> list[str]:
    """Operator names (``CONV_2D``, ...) by operator-code index; custom ops by their code."""
    schema = _schema()
    by_value = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    names = []
    for code in model.operatorCodes:
        # Codes below 127 live in the deprecated int8 field; newer ones only in builtinCode.
        value = max(code.builtinCode, code.deprecatedBuiltinCode)
        if value == schema.BuiltinOperator.CUSTOM and code.customCode:
            names.append(code.customCode.decode() if isinstance(code.customCode, bytes)
                         else str(code.customCode))
        else:
            names.append(by_value.get(value, f"OP{value}"))
    return names


def tensor_type_name(value: int) -> str:
    """The lower-case dtype name of a TFLite ``TensorType`` value, e.g. ``float32``."""
    schema = _schema()
    by_value = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    return by_value.get(value, f"type{value}").lower()
