"""An ONNX file as the OpenVINO model krimp measures (``eval.runtime: openvino``) and saves (the
``openvino`` export): one conversion for both, so the report describes the IR a user deploys."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def to_openvino(onnx_path: Path | str):
    """The ONNX file as the OpenVINO model krimp measures and saves:
    ``openvino.convert_model``, then the float copy of a tied embedding that the ONNX file keeps for its
    Gather replaced by the head's compressed codes (one copy, as the model was trained), float32
    dequantization scales that float16 holds exactly stored as float16, and zero points and per-channel
    scales stored in their own type and once per row (:func:`compact_decompressions`), and equal small
    constants (shapes, axes, slice bounds) stored once (:func:`share_small_constants`)."""
    import openvino as ov

    model = ov.convert_model(str(onnx_path))
    share_tied_embedding(model)
    half_scales(model)
    compact_decompressions(model)
    share_small_constants(model)
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


def compact_decompressions(model) -> int:
    """Store each weight decompression's zero points and scales as compactly as they are: zero points
    that OpenVINO's ONNX reader made float32 (MatMulNBits rows of an odd number of blocks) in the codes'
    integer type again, and a float or 8-bit zero point or scale that repeats over a row's blocks (a
    per-channel grid that MatMulNBits tiles with blocks) once per row, broadcast (a 4-bit one, which
    OpenVINO hands out packed, is left as it is). The same function; returns how many constants it
    stored anew."""
    import openvino.opset13 as ops

    def const_of(output):
        node = output.get_node()
        while node.get_type_name() == "Convert":
            node = node.input_value(0).get_node()
        return node if node.get_type_name() == "Constant" else None

    done = 0
    for mul in [o for o in model.get_ordered_ops() if o.get_type_name() == "Multiply"]:
        for side in (0, 1):
            chain = mul.input_value(side).get_node()
            sub = chain if chain.get_type_name() == "Subtract" else None
            codes = const_of(sub.input_value(0) if sub is not None else mul.input_value(side))
            if codes is not None and not codes.get_output_element_type(0).is_real():
                break
        else:
            continue  # not a decompression of integer codes
        kind = codes.get_output_element_type(0)
        for node, i in [(mul, 1 - side)] + ([(sub, 1)] if sub is not None else []):
            const = const_of(node.input_value(i))
            if const is None:
                continue
            value = const.get_data()
            rows = value
            blocks = tuple(codes.get_output_shape(0))[:2]  # the codes' (rows, blocks): a u4 constant's data is packed
            if (
                value.ndim == 3
                and value.shape[:2] == blocks
                and value.shape[1] > 1
                and value.shape[2] == 1
                and (value == value[:, :1]).all()
            ):
                rows = np.ascontiguousarray(value[:, :1])  # one per row, broadcast over the row's blocks
                if (rows == rows.flat[0]).all():  # a symmetric grid's zero point: one for all
                    rows = rows[:1]
            narrow = (
                node is sub
                and const.get_output_element_type(0).is_real()
                and kind.get_type_name() in ("u4", "u8")
                and np.array_equal(rows, np.round(rows))
                and rows.min() >= 0
                and rows.max() < 2**kind.bitwidth
            )
            if rows is value and not narrow:
                continue
            new = ops.constant(
                rows.astype(np.uint8) if narrow else rows, dtype=kind if narrow else const.get_output_element_type(0)
            )
            want = node.input_value(i).get_element_type()
            out = new if new.get_output_element_type(0) == want else ops.convert(new, want)
            node.input(i).replace_source_output(out.output(0))
            done += 1
    if done:
        model.validate_nodes_and_infer_types()
    return done


def share_small_constants(model, most: int = 16) -> int:
    """Point every use of a small constant (at most ``most`` values: shapes, axes, slice bounds that the
    ONNX reader writes once per node) at one constant of the same type, shape and value; returns how
    many were dropped."""
    first: dict[tuple, object] = {}
    done = 0
    for const in [o for o in model.get_ordered_ops() if o.get_type_name() == "Constant"]:
        shape = tuple(const.get_output_shape(0))
        if int(np.prod(shape)) > most:
            continue
        key = (const.get_output_element_type(0).get_type_name(), shape, const.get_data().tobytes())
        keep = first.setdefault(key, const)
        if keep is not const:
            const.output(0).replace(keep.output(0))
            done += 1
    return done
