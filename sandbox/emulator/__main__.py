"""``python -m sandbox.emulator --host 127.0.0.1 --port 8090``: serve the LiveAvatar emulator with uvicorn."""

from __future__ import annotations

import argparse

import uvicorn

from . import EmulatorConfig, create_app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sandbox.emulator", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="bind address (keep it on loopback)")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    app = create_app(EmulatorConfig())
    # Hung calls (fault injection) would otherwise block shutdown forever.
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main()
