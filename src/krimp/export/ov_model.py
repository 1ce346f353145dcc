"""An ONNX file as the OpenVINO model krimp measures (``eval.runtime: openvino``) and saves (the
``openvino`` export): one conversion for both, so the report describes the IR a user deploys."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def to_openvino(onnx_path: Path | str):
    """The ONNX file as the OpenVINO model krimp measures and saves:
    ``openvino.convert_model``, then the float copy of a tied embedding that the ONNX file keeps for its
    Gather replaced by the head's compressed codes (one copy, as the model was trained), and float32
    dequantization scales that float16 holds exactly stored as float16."""
    import openvino as ov

    model = ov.convert_model(str(onnx_path))
    share_tied_embedding(model)
    half_scales(model)
    return model


def _const_value(output) -> np.ndarray:
    """The value of a subgraph of constants (a decompression: codes, zero points, scales), computed by OpenVINO."""
    import openvino as ov

    compiled = ov.Core().compile_model(ov.Model([output], []), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return compiled({})[0]


def share_tied_embedding(model) -> bool:
    """Point the token embedding's Gather at the output head's decompressed weight, in place, where the two
    hold the same values (the head tied to the embedding, quantized: the ONNX file stores the embedding again
    in float16 for its Gather). Returns whether it did."""
    ops = model.get_ordered_ops()
    heads = [
        o
        for o in ops
        if o.get_type_name() == "MatMul"
        and o.get_attributes().get("transpose_b")
        and o.input_value(1).get_node().get_type_name() != "Constant"
        and o.input_value(1).get_partial_shape().is_static
    ]
    for g in (o for o in ops if o.get_type_name() == "Gather"):
        table = g.input_value(0)
        if table.get_node().get_type_name() != "Constant" or not table.get_partial_shape().is_static:
            continue
        shape = list(table.get_shape())
        for head in heads:
            w = head.input_value(1)
            if len(shape) != 2 or list(w.get_shape()) != shape:
                continue
            ref = table.get_node().get_data().astype(np.float32)
            got = _const_value(w)
            if np.abs(got - ref).max() <= 1e-3 * max(float(np.abs(ref).max()), 1e-12):
                g.input(0).replace_source_output(w)
                model.validate_nodes_and_infer_types()
                return True
    return False


def half_scales(model) -> int:
    """Store the float32 scale constants of weight decompressions (an integer constant converted, less its
    zero point, times a scale) as float16 where float16 holds every value exactly; returns how many."""
    import openvino.opset13 as ops

    done = 0
    for mul in [o for o in model.get_ordered_ops() if o.get_type_name() == "Multiply"]:
        a, b = (mul.input_value(i).get_node() for i in range(2))
        scale, other = (b, a) if b.get_type_name() == "Constant" else (a, b)
        if scale.get_type_name() != "Constant" or scale.get_output_element_type(0).get_type_name() != "f32":
            continue
        src = other
        while src.get_type_name() in ("Subtract", "Convert"):
            src = src.input_value(0).get_node()
        if src.get_type_name() != "Constant" or src.get_output_element_type(0).is_real():
            continue  # not a decompression of integer codes
        value = scale.get_data()
        half = value.astype(np.float16)
        if not np.array_equal(half.astype(np.float32), value):
            continue
        scale.output(0).replace(ops.convert(ops.constant(half), "f32").output(0))
        done += 1
    return done
