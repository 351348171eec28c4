"""Record the replay corpus: `make record-histories` (or `python -m tests.replay.record [NAME ...]`).

Each scenario of `tests/support/replay_scenarios.py` runs the real workflow on the time-skipping test server, and its
history is written to `histories/<name>.<CORPUS_VERSION>.json`. Recording only ever adds: a file that exists
is left as it is. After a change to what the workflow does, bump CORPUS_VERSION and record again; the new
histories sit beside the old ones and every one of them must still replay (guard the change with
`workflow.patched`, see tests/replay/test_replay.py).

Histories are written encrypted with the corpus's test key (tests/replay/codec-test-key.json, via
tests/support/codec.py), like every other file in the corpus; `python -m tests.replay.encrypt` encrypts a
plaintext history recorded elsewhere.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
from temporalio.testing import WorkflowEnvironment

from tests.support.binaries import venv_binary
from tests.support.codec import corpus_data_converter
from tests.support.replay_scenarios import SCENARIOS
from workflows.search_attributes import SEARCH_ATTRIBUTES

# The generation of the workflow these histories come from: v1 are the three files without a version in
# their name (recorded from the integration tests before the decision core moved into the machine); v2 the
# decision core; v3 the join's token minted by a local activity (`workflow.patched("local-token")`); v5 (v4 is the
# room monitor's) participant tokens bounded by the hard cap (`workflow.patched("token-ttl-within-session")`) and
# rooms named with the deployment (`session-<deployment>-<id>`); v4 the room monitor
# (`workflow.patched("room-monitor")`), recorded on its own branch; v6 the status upsert carrying support's search
# attributes (`workflow.patched("support-search-attributes")`); v7 the monitor watching the avatar's audio and
# first frames (`workflow.patched("avatar-media-watch")`), and continue-as-new (`workflow.patched("continue-as-new")`):
# the first run of a session that continued as new, and its last run, started from the carried state (both v7
# recorded on branches of their own at the same time); v7-local-room, the room created by a local activity, a join
# answered in the session's first workflow task (`workflow.patched("local-room-create")`); v8 the next recordings,
# with all of these.
CORPUS_VERSION = "v8"
HISTORIES = Path(__file__).parent / "histories"


def history_path(name: str, version: str = CORPUS_VERSION) -> Path:
    return HISTORIES / f"{name}.{version}.json"


async def add_search_attributes(env: WorkflowEnvironment) -> None:
    await env.client.operator_service.add_search_attributes(
        AddSearchAttributesRequest(
            namespace=env.client.namespace,
            search_attributes={k.name: IndexedValueType.ValueType(k.indexed_value_type) for k in SEARCH_ATTRIBUTES},
        )
    )


async def record(names: list[str]) -> int:
    unknown = sorted(set(names) - set(SCENARIOS))
    if unknown:
        print(f"no such scenario: {', '.join(unknown)}; known: {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=venv_binary("temporal-test-server"), data_converter=corpus_data_converter()
    )
    try:
        await add_search_attributes(env)
        for name in names or list(SCENARIOS):
            path = history_path(name)
            if path.exists():
                print(f"kept     {path.relative_to(HISTORIES.parent)} (recording never overwrites; bump CORPUS_VERSION)")
                continue
            handle = await SCENARIOS[name](env)
            path.write_text((await handle.fetch_history()).to_json() + "\n")
            print(f"recorded {path.relative_to(HISTORIES.parent)}")
    finally:
        await env.shutdown()
    return 0


if __name__ == "__main__":
    rc = asyncio.run(record(sys.argv[1:]))
    sys.stdout.flush()
    os._exit(rc)  # the Temporal runtime can crash at interpreter exit (sdk-python#300)
