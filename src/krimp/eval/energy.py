"""Energy per inference and cost per million inferences.

Where the machine exposes an energy counter (Intel RAPL under /sys/class/powercap) krimp could read
it; on machines without one (most VMs, this one included) it models energy from measured CPU time:
``J = CPU-seconds per inference x watts per busy core`` and ``$ = CPU-seconds x price per core-hour``.
Both are labelled estimates and carry their assumptions into the report.
"""

from __future__ import annotations

from pathlib import Path

RAPL = Path("/sys/class/powercap/intel-rapl:0/energy_uj")


def energy_source() -> str:
    try:
        RAPL.read_text()
        return "rapl-available"
    except OSError:
        return "model"


def estimate(bench: dict | None, spec) -> dict:
    """Energy and cost per inference from a timing's CPU seconds (None for a run that was not timed)."""
    if bench is None:
        return {"energy_j_per_inference": None, "cost_usd_per_million": None}
    cpu = bench["cpu_s_per_inference"]
    return {
        "energy_j_per_inference": cpu * spec.watts_per_core,
        "cost_usd_per_million": cpu * 1e6 / 3600.0 * spec.usd_per_core_hour,
    }


def assumptions(spec) -> dict:
    return {
        "method": "estimate from measured CPU time (no energy counter read)",
        "counter": energy_source(),
        "watts_per_core": spec.watts_per_core,
        "usd_per_core_hour": spec.usd_per_core_hour,
        "formula": "energy = cpu_s_per_inference * watts_per_core; "
        "cost = cpu_s_per_inference / 3600 * usd_per_core_hour * 1e6",
        "inference": "one sample (one row of a batch)",
    }
