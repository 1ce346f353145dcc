import pydantic
import pytest

from krimp.errors import KrimpError
from krimp.methods import REGISTRY, config_from_dict
from krimp.quant import DynamicInt8Config, StaticInt8Config
from krimp.recipe import Recipe


def test_registry_is_visible_and_complete():
    assert {"int8-dynamic", "int8-static", "fp16", "bf16"} <= set(REGISTRY)
    assert REGISTRY["int8-static"][0] is StaticInt8Config


def test_unknown_top_level_key_names_place_and_closest():
    with pytest.raises(KrimpError, match=r"unknown key 'stagse' in recipe; did you mean 'stages'"):
        Recipe.from_dict({"stagse": []})


def test_unknown_nested_key_names_section():
    with pytest.raises(KrimpError, match=r"unknown key 'calib_sample' in recipe.data; did you mean 'calib_samples'"):
        Recipe.from_dict({"data": {"calib_sample": 4}})


def test_unknown_stage_key_names_stage_and_closest():
    with pytest.raises(KrimpError, match=r"unknown key 'per_chanel' in stages\[0\]; did you mean 'per_channel'"):
        Recipe.from_dict({"stages": [{"method": "int8-dynamic", "per_chanel": True}]})


def test_unknown_method_suggests():
    with pytest.raises(
        KrimpError, match=r"stages\[1\].method: unknown method 'int8-dynamc'; did you mean 'int8-dynamic'"
    ):
        Recipe.from_dict({"stages": [{"method": "fp16"}, {"method": "int8-dynamc"}]})


def test_wrong_value_type_names_field_path():
    with pytest.raises(KrimpError, match=r"stages\[0\]\.calibration"):
        Recipe.from_dict({"stages": [{"method": "int8-static", "calibration": "median"}]})
    with pytest.raises(KrimpError, match=r"recipe\.data\.calib_samples"):
        Recipe.from_dict({"data": {"calib_samples": "many"}})
    with pytest.raises(KrimpError, match=r"recipe\.data\.calib_samples"):
        Recipe.from_dict({"data": {"calib_samples": 0}})


def test_configs_are_frozen_and_validated():
    cfg = DynamicInt8Config(per_channel=False)
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        cfg.per_channel = True  # type: ignore[misc]
    with pytest.raises(KrimpError):
        config_from_dict({"method": "int8-static", "percentile": 50})


def test_round_trip_dict_and_yaml(tmp_path):
    import yaml

    r = Recipe.from_dict(
        {
            "model": "builtin:minilm",
            "goal": {"max_quality_drop": 0.01},
            "stages": [{"method": "int8-static", "calibration": "entropy", "ignore": ["*fc*"]}],
        }
    )
    d = r.to_dict()
    assert d["stages"][0] == StaticInt8Config(calibration="entropy", ignore=["*fc*"]).to_dict()
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(d))
    r2 = Recipe.from_yaml(p)
    assert r2.to_dict() == d
    assert r2.stages[0].calibration == "entropy"


def test_missing_and_broken_yaml(tmp_path):
    with pytest.raises(KrimpError, match="recipe not found"):
        Recipe.from_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [\n")
    with pytest.raises(KrimpError, match="not valid YAML"):
        Recipe.from_yaml(bad)


def test_shipped_recipes_parse_and_resolve_by_name(tmp_path, monkeypatch):
    from krimp.recipe import find_recipe, recipe_summary, shipped_recipes
    from krimp.search.space import load_space

    shipped = shipped_recipes()
    assert len(shipped) >= 20 and all(p.is_file() for p in shipped.values())
    searches = [n for n in shipped if n.startswith("search-")]
    assert searches
    for name, f in shipped.items():
        assert 20 < len(recipe_summary(f)) <= 120, name  # `krimp recipes` has a line to show
        if name in searches:
            with pytest.raises(KrimpError, match="krimp search"):
                Recipe.from_yaml(name)
            assert load_space(name).spec.candidates, name
        else:
            assert Recipe.from_yaml(name).stages == Recipe.from_yaml(f).stages, name
    monkeypatch.chdir(tmp_path)
    assert find_recipe("minilm-int8.yaml") == shipped["minilm-int8"]  # the name with its suffix works too
    (tmp_path / "minilm-int8.yaml").write_text("stages: []\n")
    assert find_recipe("minilm-int8.yaml").resolve() == tmp_path / "minilm-int8.yaml"  # a file of that name first
    with pytest.raises(KrimpError, match="did you mean 'minilm-int8'"):
        find_recipe("minilm-int9")
    with pytest.raises(KrimpError, match="krimp recipes"):
        find_recipe("sub/none.yaml")


def test_settings_from_the_command_line():
    from krimp.recipe import apply_settings, parse_value

    assert [parse_value(v) for v in ("4", "0.5", "true", "2:4", "[a, b]", "null", "x")] == [
        4,
        0.5,
        True,
        "2:4",
        ["a", "b"],
        None,
        "x",
    ]
    d = {"stages": [{"method": "smoothquant"}, {"method": "gptq", "bits": 8}], "data": {"seq_len": 64}}
    out = apply_settings(d, {"bits": 4, "alpha": 0.6, "data.source": "c.txt", "goal.max_kl": 0.1, "task": "causal-lm"})
    assert out["stages"] == [{"method": "smoothquant", "alpha": 0.6}, {"method": "gptq", "bits": 4}]
    assert out["data"] == {"seq_len": 64, "source": "c.txt"} and out["goal"] == {"max_kl": 0.1}
    assert out["task"] == "causal-lm" and d["stages"][1]["bits"] == 8  # the input is not changed
    assert apply_settings(d, {"eval.energy.watts_per_core": 7})["eval"] == {"energy": {"watts_per_core": 7}}
    with pytest.raises(KrimpError, match="no stage has a setting 'sparsity' \\(stages: smoothquant, gptq\\)"):
        apply_settings(d, {"sparsity": 0.5})
    with pytest.raises(KrimpError, match="did you mean 'damp'"):
        apply_settings(d, {"dampp": 0.1})
    Recipe.from_dict(out)  # what the flags built is a valid recipe
