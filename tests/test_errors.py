"""A missing optional extra is one KrimpError line naming the pip command that installs it; a package
that is installed but fails on an import of its own is not mistaken for a missing extra."""

import sys

import numpy as np
import pytest

from krimp.errors import KrimpError, require


def _channels_stage():
    from krimp.methods import config_from_dict, method_for
    from krimp.models.builtin import DigitsCNN
    from krimp.models.tasks import make_task
    from krimp.stage import StageContext

    task = make_task("image-classification", mean=0.0, std=16.0, channels=1, image_size=8)
    cfg = config_from_dict({"method": "channels", "ratio": 0.25, "importance": "bn"})
    feeds = [{"pixel_values": np.zeros((2, 1, 8, 8), np.float32)}]
    method_for(cfg).apply_torch(DigitsCNN().eval(), cfg, StageContext(task, feeds, 1))


def _search_storage():
    from krimp.search.study import open_storage

    open_storage(None)


def _wikipedia():
    from krimp.data.builtin import _read_wikipedia

    _read_wikipedia()


@pytest.mark.parametrize(
    "module,extra,use",
    [
        ("optuna", "search", _search_storage),
        ("torch_pruning", "prune", _channels_stage),
        ("gensim", "models", _wikipedia),
    ],
)
def test_missing_extra_is_one_line_naming_the_pip_command(monkeypatch, module, extra, use):
    monkeypatch.setitem(sys.modules, module, None)  # what `import module` sees when it is not installed
    with pytest.raises(KrimpError) as e:
        use()
    msg = str(e.value)
    assert "\n" not in msg and msg.endswith(f"pip install 'krimp[{extra}]'"), msg
    assert e.value.__cause__ is None and e.value.__suppress_context__  # no chained traceback in the CLI


def test_require_returns_the_module_and_keeps_a_broken_package_s_own_error(tmp_path, monkeypatch):
    assert require("json", "x", "this test").dumps([1]) == "[1]"
    (tmp_path / "krimp_test_broken.py").write_text("import krimp_test_absent_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as e:
        require("krimp_test_broken", "x", "this test")
    assert e.value.name == "krimp_test_absent_dependency"
    with pytest.raises(
        KrimpError,
        match=r"^this test needs krimp-test-missing, which is not installed: "
        r"pip install 'krimp\[x\]'$",
    ):
        require("krimp_test_missing", "x", "this test", "krimp-test-missing")
