"""The configs `make cluster` writes (sandbox/cluster.py), checked without starting anything: every process of the
cluster listens on loopback only, on ports of its own, and they all describe the same cluster."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sandbox.cluster import DYNAMIC_CONFIG, TEMPORAL_PROCESSES, ClusterPorts, TemporalCluster

LOOPBACK = "127.0.0.1"
Config = dict[str, Any]  # a parsed YAML document


@pytest.fixture
def configs(tmp_path: Path) -> dict[str, Config]:
    cluster = TemporalCluster(ports=ClusterPorts(5500), state_dir=tmp_path)
    cluster._write_configs()
    return {name: json.loads((tmp_path / "config" / f"{name}.yaml").read_text()) for name in TEMPORAL_PROCESSES}


def listening(config: Config, process: str) -> Config:
    """The rpc section of the service `process` runs (`history2` runs the history service)."""
    rpc: Config = config["services"]["history" if process.startswith("history") else process]["rpc"]
    return rpc


def test_every_process_binds_loopback_on_ports_of_its_own(configs: dict[str, Config]) -> None:
    ports: list[int] = []
    for process, config in configs.items():
        rpc = listening(config, process)
        assert rpc["bindOnIP"] == LOOPBACK
        ports += [int(p) for key, p in rpc.items() if key.endswith("Port")]
        assert config["global"] == {"membership": {"maxJoinDuration": "30s", "broadcastAddress": LOOPBACK}}
    assert len(ports) == len(set(ports)), f"two processes share a port: {sorted(ports)}"
    assert all(22000 < p < 23000 for p in ports), "SESSIONFLOW_PORT_OFFSET moves every port"


def test_no_process_opens_a_metrics_or_pprof_port(configs: dict[str, Config]) -> None:
    for config in configs.values():
        assert "metrics" not in config["global"] and "pprof" not in config["global"]


def test_the_processes_describe_one_cluster_on_one_database(configs: dict[str, Config]) -> None:
    shared = {json.dumps({k: v for k, v in c.items() if k != "services"}, sort_keys=True) for c in configs.values()}
    assert len(shared) == 1, "the processes disagree on persistence, cluster metadata or dynamic config"
    frontend = listening(configs["frontend"], "frontend")
    for process, config in configs.items():
        assert listening(config, "frontend") == frontend, f"{process} looks for the frontend elsewhere"
    persistence = configs["frontend"]["persistence"]
    assert persistence["numHistoryShards"] == 4
    stores = persistence["datastores"]
    assert {s["sql"]["connectAddr"] for s in stores.values()} == {f"{LOOPBACK}:{ClusterPorts(5500).postgres}"}


def test_the_dynamic_config_enables_update_with_start_and_eager_activities(tmp_path: Path) -> None:
    TemporalCluster(state_dir=tmp_path)._write_configs()
    text = (tmp_path / "config" / "dynamicconfig.yaml").read_text()
    for key in ("frontend.enableExecuteMultiOperation", "frontend.enableUpdateWorkflowExecution",
                "system.enableActivityEagerExecution"):
        assert f"{key}:\n  - value: true\n" in text
    assert DYNAMIC_CONFIG["frontend.enableServerVersionCheck"] is False
