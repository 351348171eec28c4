"""Re-record the replay histories: `make record-histories` (runs inside the local stack).

Runs the integration scenarios with SESSIONFLOW_RECORD_HISTORIES set; each scenario that ends a session
writes its history to tests/replay/histories/<scenario>.json. Commit the result after a deliberate change
of the workflow's behaviour (and keep the old histories passing with `workflow.patched` where sessions may
still be running).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

if __name__ == "__main__":
    os.environ["SESSIONFLOW_RECORD_HISTORIES"] = "1"
    here = Path(__file__).parent
    sys.exit(pytest.main([str(here.parent / "integration"), "-q", "-p", "no:cacheprovider", *sys.argv[1:]]))
