"""Students built from the teacher (kept layers, narrowed) or given, and the errors for bad ones."""

import copy

import pytest
import torch

from krimp.distill.students import StudentSpec, build_student, check_layer_map, default_layer_map, kept_layers
from krimp.errors import KrimpError


def test_kept_layers():
    assert kept_layers(StudentSpec(every=2), 6) == [1, 3, 5]
    assert kept_layers(StudentSpec(depth=3), 6) == [0, 2, 5]
    assert kept_layers(StudentSpec(depth=15), 30)[-1] == 29 and len(kept_layers(StudentSpec(depth=15), 30)) == 15
    assert kept_layers(StudentSpec(layers=[4, 0]), 6) == [0, 4]
    with pytest.raises(KrimpError, match="layers 0..5"):
        kept_layers(StudentSpec(layers=[6]), 6)
    with pytest.raises(KrimpError, match="deeper than the teacher"):
        kept_layers(StudentSpec(depth=7), 6)
    with pytest.raises(ValueError, match="one of layers"):
        StudentSpec(every=2, depth=3)


def test_student_from_teacher_layers(minilm):
    teacher = minilm.module
    before = copy.deepcopy(teacher.state_dict())
    student, keep, notes = build_student(teacher, StudentSpec(every=2), minilm.task, [])
    assert keep == [1, 3, 5] and len(student.encoder.layer) == 3 and student.config.num_hidden_layers == 3
    assert torch.equal(student.encoder.layer[2].output.dense.weight, teacher.encoder.layer[5].output.dense.weight)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())  # teacher untouched
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
    with torch.no_grad():
        hs = student(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True).hidden_states
    assert len(hs) == 4
    assert default_layer_map(keep) == {1: 2, 2: 4, 3: 6}


def test_narrowed_student(minilm):
    feeds = [minilm.task.encode(["a short sentence about lists", "dicts map keys to values"], 32)]
    student, keep, notes = build_student(minilm.module, StudentSpec(depth=2, ffn=0.5), minilm.task, feeds)
    assert len(keep) == 2 and notes["ffn_kept"] == [768, 768]
    assert student.encoder.layer[0].intermediate.dense.out_features == 768


def test_layer_map_outside_the_teacher():
    check_layer_map({1: 2, 3: 6}, 3, 6)
    with pytest.raises(KrimpError, match="outside the teacher"):
        check_layer_map({1: 7}, 3, 6)
    with pytest.raises(KrimpError, match="student state 4"):
        check_layer_map({4: 6}, 3, 6)


def test_given_student_wider_than_teacher(minilm, tmp_path):
    import transformers as tf

    cfg = tf.BertConfig(
        vocab_size=minilm.task.tokenizer.vocab_size,
        hidden_size=512,
        num_hidden_layers=2,
        num_attention_heads=8,
        intermediate_size=512,
    )
    tf.BertModel(cfg).save_pretrained(tmp_path)
    minilm.task.tokenizer.save_pretrained(tmp_path)
    with pytest.raises(KrimpError, match="wider than its teacher"):
        build_student(minilm.module, StudentSpec(path=str(tmp_path)), minilm.task, [])


def test_student_keeps_the_most_influential_layers(minilm):
    from krimp.models.arch import find_layers
    from krimp.prune.transformer import block_influence

    task = minilm.task
    feeds = [task.encode(["a list keeps items in order", "dicts map keys to values", "open() returns a file"], 32)]
    student, keep, notes = build_student(minilm.module, StudentSpec(depth=3, by="influence"), task, feeds)
    scores = block_influence(minilm.module, task, feeds, find_layers(minilm.module)[1])
    assert keep == sorted(torch.topk(scores, 3).indices.tolist()) == notes["kept_layers"]
    assert len(notes["layer_influence"]) == 6 and min(scores[keep]) >= max(
        scores[[i for i in range(6) if i not in keep]]
    )
    assert torch.equal(
        student.encoder.layer[0].output.dense.weight, minilm.module.encoder.layer[keep[0]].output.dense.weight
    )
    with pytest.raises(ValueError, match="give depth"):
        StudentSpec(every=2, by="influence")
    with pytest.raises(KrimpError, match="needs transfer data"):
        build_student(minilm.module, StudentSpec(depth=3, by="influence"), task, [])
