"""docs/grafana-dashboard.json charts only series the code emits (a renamed metric would leave a panel empty)."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).parents[2]
EMITTERS = [ROOT / "workflows" / "metrics.py", ROOT / "activities" / "metrics.py", ROOT / "workers" / "metrics.py"]
# How the Prometheus exporter names a counter's and a histogram's series (counters_total_suffix=True).
SUFFIXES = ("", "_total", "_sum", "_count", "_bucket")


def test_every_engine_series_on_the_dashboard_is_emitted() -> None:
    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(dashboard["panels"]) >= 10 and all(p["targets"] for p in dashboard["panels"])
    charted = {name for e in exprs for name in re.findall(r"\bsessionflow_[a-z_]+", e)}
    created = {name for f in EMITTERS for name in re.findall(r'"(sessionflow_[a-z_]+)"', f.read_text())}
    emitted = {name + suffix for name in created for suffix in SUFFIXES}
    assert charted and charted <= emitted, f"charted but never emitted: {sorted(charted - emitted)}"
    assert {n.removesuffix("_total").removesuffix("_sum") for n in charted} == created, "an emitted figure is not charted"
