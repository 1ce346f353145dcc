"""ONNX of a model whose weights are not in memory (a streamed decoder, :mod:`krimp.models.lazy`),
written one tensor at a time.

torch's exporter traces the graph with ``export_params=False``: every weight becomes a graph input,
and each is traced as a placeholder of its shape (memory never written, so not resident). The inputs then become initializers
stored beside the graph as ONNX external data (``<name>.data``), each made and written in turn:

- a linear with codes: ONNX Runtime's ``MatMulNBits`` from the codes (:func:`krimp.export.onnx_nbits.matmul_nbits`);
- any other linear: its transposed weight, the transpose folded into what is stored (a tied table in
  float keeps its Transpose in the graph, so that it is stored once);
- a tied embedding with codes: float16 behind a ``Cast``, as :mod:`krimp.export.onnx_nbits` writes it;
- the rest as the model holds it, or as the file has it.

So the memory used is the graph and one tensor, not the model (the in-memory route, torch's exporter
with the weights, holds two more copies of the model while it writes). The graph is the one torch's
exporter writes in memory, with the same node names, so the same module paths find the same linears.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import torch

from krimp.errors import KrimpError
from krimp.export.onnx import trace
from krimp.export.onnx_nbits import block_size, matmul_nbits
from krimp.export.onnx_utils import module_path
from krimp.models.lazy import lazy_of, put_tensor
from krimp.quant.wq import quantized_layers

PREFIX = "module."  # the export wrapper's attribute: the graph inputs are named "module.<parameter>"


@contextlib.contextmanager
def _shapes_without_values():
    """Inside: the exporter's ONNX shape inference is given the weights' shapes (the graph's inputs
    carry them) but not their values. With values it writes every weight into an ONNX model to infer
    from (the whole model again in memory, and 45 s for Gemma 3's 262k x 640 table); no value of a
    weight decides a shape in these graphs."""
    real = torch._C._jit_pass_onnx_graph_shape_type_inference
    torch._C._jit_pass_onnx_graph_shape_type_inference = lambda graph, _params, opset: real(graph, {}, opset)
    try:
        yield
    finally:
        torch._C._jit_pass_onnx_graph_shape_type_inference = real


@contextlib.contextmanager
def _placeholders(module: torch.nn.Module):
    """Inside: each parameter of ``module`` is a float32 placeholder of its shape, never written: its
    pages stay unmapped, so the trace reads the kernel's zero page and a 262k x 640 table costs no
    resident memory (an expanded single value would be copied out whole by the first matmul). The
    real tensors come back after."""
    held = []
    try:
        for p in dict.fromkeys(module.parameters()):  # a tied tensor once
            value = torch.empty(p.shape, dtype=torch.float32 if p.is_floating_point() else p.dtype)
            held.append((p, put_tensor(p, value)))
        yield
    finally:
        for p, old in held:
            torch.utils.swap_tensors(p, old)


class _Data:
    """The external-data file: tensors appended one at a time, each an initializer that points into it."""

    def __init__(self, path: Path):
        self.path, self.f, self.offset = path, open(path, "wb"), 0

    def add(self, graph, name: str, arr: np.ndarray) -> None:
        self.add_parts(graph, name, arr.shape, arr.dtype, [arr])

    def add_parts(self, graph, name: str, shape, dtype, parts) -> None:
        """A tensor of ``shape`` and ``dtype`` written as the arrays ``parts`` yields, in order."""
        import onnx

        t = onnx.TensorProto(name=name, data_type=onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))
        t.dims.extend(shape)
        start = self.offset
        for part in parts:
            part = np.ascontiguousarray(part, dtype)
            part.tofile(self.f)
            self.offset += part.nbytes
        if self.offset - start != int(np.prod(shape)) * np.dtype(dtype).itemsize:
            raise KrimpError(f"ONNX export: {name} wrote {self.offset - start} bytes for shape {tuple(shape)}")
        for key, v in (("location", self.path.name), ("offset", start), ("length", self.offset - start)):
            entry = t.external_data.add()
            entry.key, entry.value = key, str(v)
        t.data_location = onnx.TensorProto.EXTERNAL
        graph.initializer.append(t)


def export_onnx_streamed(
    module: torch.nn.Module, task, feed: dict[str, np.ndarray], path: Path, opset: int, props: dict
) -> dict:
    """Write ``module`` (a lazily opened decoder after its stages) as ``path`` + ``path.data``; returns
    what was written (linears as MatMulNBits, kept in float, the embedding in float16)."""
    import onnx
    from onnx import TensorProto, helper

    lazy = lazy_of(module)
    params = dict(module.named_parameters(remove_duplicate=False))
    graph_file = path.with_name(path.name + ".graph")
    try:
        with _placeholders(module), _shapes_without_values():
            trace(
                module,
                task,
                feed,
                graph_file,
                opset,
                do_constant_folding=False,
                export_params=False,
                keep_initializers_as_inputs=True,  # no merging of equal weights: it compares every pair by value
            )
        m = onnx.load(str(graph_file))
    finally:
        graph_file.unlink(missing_ok=True)
    g = m.graph
    weights = {i.name: params[i.name[len(PREFIX) :]] for i in g.input if i.name[len(PREFIX) :] in params}
    unknown = [i.name for i in g.input if i.name not in weights and i.name not in task.input_names]
    if unknown:
        raise KrimpError(f"ONNX export: graph inputs {', '.join(unknown[:3])} are not the model's parameters")
    all_nodes = list(g.node)  # one wrapper per node, so nodes are known by identity below
    consumers: dict[str, list] = {}
    for node in all_nodes:
        for x in node.input:
            consumers.setdefault(x, []).append(node)
    producer = {o: node for node in all_nodes for o in node.output}
    qlins = quantized_layers(module)
    # each weight with codes, by identity: a tied embedding is the head's weight and takes its codes
    codes = {id(module.get_submodule(path).weight): qw for path, qw in qlins.items()}
    emb = module.get_input_embeddings()
    emb_q = codes.get(id(emb.weight))  # an embedding with codes: tied to a quantized head

    def value(name: str) -> torch.Tensor:
        """A weight's float32 values: its codes' where it has codes (a streamed model's weight is then
        not in memory, and its file holds the original), else the model's, else the file's."""
        p = weights[name]
        return lazy.current(p, codes.get(id(p))) if lazy is not None else p.detach().float()

    data = _Data(path.with_name(path.name + ".data"))
    replace: dict[int, list] = {}  # id(node) -> the nodes in its place
    nbits, kept, emb_half = 0, [], False
    try:
        for node in all_nodes:
            # a linear: MatMul(x, Transpose(weight)) -> MatMulNBits from its codes, or the weight stored transposed
            tr = producer.get(node.input[1]) if node.op_type == "MatMul" else None
            w_name = tr.input[0] if tr is not None and tr.op_type == "Transpose" else None
            if w_name not in weights or len(consumers[tr.output[0]]) != 1:
                continue
            qw = codes.get(id(weights[w_name]))  # by the weight itself, not by the node's name
            bs = block_size(qw) if qw is not None else None
            if bs is not None:
                mm, arrays = matmul_nbits(qw, bs, node.input[0], list(node.output), node.name + "NBits", w_name)
                for n, a in arrays.items():
                    data.add(g, n, a)
                replace[id(node)] = [mm]
                nbits += 1
            else:
                if qw is not None:
                    kept.append(
                        f"{module_path(node.name)}: group {qw.group} is not a power of two >= 16; kept in float"
                    )
                if len(consumers[w_name]) > 1:  # a tied table: stored once, transposed in the graph
                    continue
                data.add(g, tr.output[0], value(w_name).t().numpy())
            replace[id(tr)] = []
            consumers[w_name].remove(tr)
        for name in weights:  # what is left: embeddings, norms, biases, a tied table
            users = consumers.get(name, [])
            if not users:
                continue
            if emb_q is not None and weights[name] is emb.weight:
                gathers = [n for n in users if n.op_type == "Gather"]
                for gn in gathers:  # looked up in float16 and cast, as onnx_nbits writes a quantized embedding
                    out = gn.output[0]
                    gn.input[0], gn.output[0] = name + "_fp16", out + "_fp16"
                    cast = helper.make_node(
                        "Cast", [out + "_fp16"], [out], name=gn.name + "_cast", to=TensorProto.FLOAT
                    )
                    replace[id(gn)] = [gn, cast]
                if gathers:  # from the codes a slice of rows at a time (262k x 640 is 671 MB in float32)
                    rows = range(0, emb_q.shape[0], 1 << 14)
                    halves = (emb_q.rows(r, r + (1 << 14)).dequantize().numpy() for r in rows)
                    data.add_parts(g, name + "_fp16", emb_q.shape, np.float16, halves)
                    emb_half = True
                if len(gathers) == len(users):
                    continue
            data.add(g, name, value(name).numpy())
    finally:
        data.f.close()
    nodes = [new for node in all_nodes for new in replace.get(id(node), [node])]
    del g.node[:]
    g.node.extend(nodes)
    inputs = [i for i in g.input if i.name in task.input_names]
    del g.input[:]
    g.input.extend(inputs)
    if nbits and not any(o.domain == "com.microsoft" for o in m.opset_import):
        m.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    helper.set_model_props(m, props)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    onnx.save(m, str(tmp))
    os.replace(tmp, path)
    return {"matmul_nbits": nbits, "kept_float": kept, "embedding_fp16": emb_half, "external_data": data.path.name}
