import asyncio
import os
import sys

from config.settings import get_settings
from workers.logging import configure_logging
from workers.worker import run_worker

if __name__ == "__main__":
    settings = get_settings()
    configure_logging(settings.log_format, settings.log_level)
    asyncio.run(run_worker(settings, media="--media" in sys.argv[1:]))
    sys.stderr.flush()
    # The Temporal runtime can crash at interpreter exit (sdk-python#300); the worker has stopped cleanly here.
    os._exit(0)
