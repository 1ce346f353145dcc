"""report.html as a reader sees it: rendered by headless Chromium, it opens with the verdict, one
row per goal with its limit, the measured value and interval, and a met / missed / within-noise mark.
Set KRIMP_SCREENSHOTS=DIR to keep the screenshots."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import krimp

pytestmark = pytest.mark.slow  # two whole runs on the digits CNN, each page rendered by headless Chromium

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
RECIPE = {
    "model": "builtin:digits-cnn",
    "data": {"source": "builtin:digits", "calib_samples": 64, "eval_samples": 200},
    "eval": {"batch": 32, "repeats": 3, "warmup": 1, "bootstrap": 200, "timing_budget_s": 5},
    "stages": [{"method": "int8-static"}],
}


def _browser(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="module", params=["met", "missed"])
def run(request, tmp_path_factory):
    goal = {"max_quality_drop": 0.05} if request.param == "met" else {"max_quality_drop": 0.05, "max_size_ratio": 0.1}
    out = tmp_path_factory.mktemp("html") / request.param
    return request.param, krimp.compress(None, {**RECIPE, "goal": goal}, out), out


def test_the_page_is_one_document_with_the_verdict_first(run):
    kind, r, out = run
    page = (out / "report.html").read_text()
    assert "<pre>" not in page  # no dump of report.md inside the page
    assert page.index('id=verdict') < page.index("Baseline and compressed") < page.index("<img")
    assert len(re.findall(r"<tr class=(ok|miss|noise)>", page)) == len(r["goals"]) == (1 if kind == "met" else 2)


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (make setup installs it as root)")
def test_chromium_renders_the_verdict_rows(run, tmp_path):
    kind, r, out = run
    url = (out / "report.html").as_uri()
    dom = _browser("--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-500:]
    rows = re.findall(
        r'<tr class="(ok|miss|noise)"><td>([^<]+)</td><td>([^<]+)</td><td>([^<]+)</td>'
        r'<td class="mark">([a-z ]+)',
        dom.stdout,
    )
    assert [(m, v) for _, m, _, _, v in rows] == [(g["metric"], g["verdict"]) for g in r["goals"]]
    outcome = re.search(r'<h2 id="outcome" class="(ok|miss)">([^<]+)</h2>', dom.stdout)
    assert outcome.group(2) == ("within goal" if kind == "met" else "goal missed")
    if kind == "missed":
        assert ("size_ratio", "missed") in [(m, v) for _, m, _, _, v in rows]
    shots = Path(os.environ.get("KRIMP_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    png = shots / f"report-{kind}.png"
    shot = _browser(f"--screenshot={png}", "--window-size=1000,1300", url)
    assert shot.returncode == 0 and png.stat().st_size > 10_000, shot.stderr[-500:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
