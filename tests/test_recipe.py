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


def test_shipped_recipes_parse():
    from pathlib import Path

    files = sorted(Path(__file__).parents[1].joinpath("recipes").glob("*.yaml"))
    assert len(files) >= 3
    from krimp.search.space import load_space

    searches = [f for f in files if f.name.startswith("search-")]
    assert searches
    for f in files:
        if f in searches:
            with pytest.raises(KrimpError, match="krimp search"):
                Recipe.from_yaml(f)
            space = load_space(f)
            assert space.spec.candidates, f
        else:
            assert Recipe.from_yaml(f).stages, f
