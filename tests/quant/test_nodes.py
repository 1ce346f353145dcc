from krimp.export.onnx_utils import module_path
from krimp.quant.nodes import matches


def test_module_path_from_onnx_node_name():
    assert module_path("/encoder/layer.0/output/dense/MatMul") == "encoder.layer.0.output.dense"
    assert module_path("Attention_3") == "Attention_3"
    assert module_path("/module/encoder/layer.3/output/dense/MatMul") == "encoder.layer.3.output.dense"
    assert module_path("/module/features/features.0/Conv") == "features.0"
    assert module_path("/module/_blocks.0/_depthwise_conv/Conv") == "_blocks.0._depthwise_conv"


def test_patterns_match_node_or_module_names():
    n = "/encoder/layer.3/output/dense/MatMul"
    assert matches(n, ["encoder.layer.3.*"])
    assert matches(n, ["*/output/dense/*"])
    assert not matches(n, ["encoder.layer.4.*"])
    assert not matches(n, [])
