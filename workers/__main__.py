import asyncio

from workers.logging import configure_logging
from workers.settings import get_settings
from workers.worker import run_worker

if __name__ == "__main__":
    settings = get_settings()
    configure_logging(settings.log_format, settings.log_level)
    asyncio.run(run_worker(settings))
