"""`sessionflow`: the command line for developers and support.

    sessionflow worker [--media]         a worker against TEMPORAL_ADDRESS (--media: the room monitors)
    sessionflow join SPEC IDENTITY       start the session in SPEC (JSON file or text) if needed, print a grant
    sessionflow end SESSION_ID [--reason TEXT]
    sessionflow extend SESSION_ID SECONDS
    sessionflow show SESSION_ID          a session's header, timeline, avatar billing and Temporal UI link
    sessionflow list [--status S] [--kind K] [--end-reason R] [--degraded yes|no] [--participant IDENTITY] [--limit N]
                                         sessions by the search attributes the UI filters on, newest first
    sessionflow reap [--dry-run] [--grace SECONDS]   sweep for orphaned rooms and avatars now, print the report
    sessionflow api-key [--name NAME]    make a key for the sessions HTTP API: prints it once, and the hash to configure

The local stack is development tooling, not part of the engine: `python -m sandbox dev` (stack + worker in the
foreground) and `python -m sandbox demo` (`make demo`) run it; `sessionflow dev` and `sessionflow demo` only
say so.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import sys
import uuid
from datetime import timedelta
from pathlib import Path

from pydantic import ValidationError
from temporalio.client import WorkflowFailureError
from temporalio.service import RPCError

from config.settings import get_settings
from starters.api import new_api_key
from starters.client import (
    SessionClient,
    SessionError,
    check_extend,
    check_join,
    check_session_id,
    check_spec,
    summarize,
)
from starters.report import MAX_LIST_LIMIT, find_sessions, read_session, render_session, render_sessions, session_filter
from starters.text import table
from workers.codec import CodecKeyError, UndecryptablePayload
from workers.logging import configure_logging
from workers.temporal import TemporalSettingsError, TemporalUnavailable, connect
from workers.worker import run_worker
from workflows.models import ROOM_PREFIX, EndReason, SessionKind, SessionStatus
from workflows.reaper import ReaperWorkflow
from workflows.reaper_models import ReapReport, ReapRequest


def _load_spec(text: str) -> object:
    """SPEC is JSON text (it starts with `{`) or the path of a UTF-8 JSON file; any other case is one clear error.

    JSON text is never looked up as a file name (a long spec is not a "file name too long")."""
    raw = text if text.lstrip().startswith("{") else _read_spec_file(text)
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise SessionError(f"SPEC must be a JSON file or JSON text: {e}") from None


def _read_spec_file(name: str) -> str:
    path = Path(name)
    try:
        return path.read_bytes().decode("utf-8")
    except IsADirectoryError:
        raise SessionError(f"SPEC {name!r} is a directory; give a JSON file or JSON text") from None
    except FileNotFoundError:
        raise SessionError(f"SPEC {name!r} is neither JSON text nor an existing file") from None
    except UnicodeDecodeError as e:
        raise SessionError(f"SPEC file {name!r} is not UTF-8 text (byte {e.start}); save it as UTF-8 JSON") from None
    except OSError as e:
        shown = name if len(name) <= 80 else name[:60] + "…"
        raise SessionError(f"cannot read SPEC file {shown!r}: {e.strerror or e}") from None


async def _join(args: argparse.Namespace) -> int:
    spec = check_spec(_load_spec(args.spec))  # type: ignore[arg-type]  # any JSON value: check_spec validates it
    check_join(spec, args.identity)  # bad input is refused before anything is contacted
    sessions = await SessionClient.connect()
    grant = await sessions.join(spec, args.identity)
    print(grant.model_dump_json(indent=2))
    return 0


async def _end(args: argparse.Namespace) -> int:
    check_session_id(args.session_id)  # refused before anything is contacted
    sessions = await SessionClient.connect()
    state = await sessions.end(args.session_id, args.reason)
    print(state.model_dump_json(indent=2))
    return 0


async def _extend(args: argparse.Namespace) -> int:
    check_session_id(args.session_id)  # refused before anything is contacted
    check_extend(timedelta(seconds=args.seconds))
    sessions = await SessionClient.connect()
    state = await sessions.extend(args.session_id, timedelta(seconds=args.seconds))
    print(f"session {state.session_id} now ends at {state.ends_at.isoformat()}")
    return 0


async def _show(args: argparse.Namespace) -> int:
    check_session_id(args.session_id)  # a malformed id is refused before anything is contacted
    sessions = await SessionClient.connect()
    print(render_session(await read_session(sessions, args.session_id)))
    return 0


async def _consent(args: argparse.Namespace) -> int:
    """Grant or withdraw a participant's consent to record; print the recording as it now stands."""
    sessions = await SessionClient.connect()
    state = await sessions.consent(args.session_id, args.identity, args.decision == "grant")
    recording = state.recording
    assert recording is not None  # a session that is not recorded refuses consent
    waiting = f"; waiting for: {', '.join(recording.waiting_for)}" if recording.waiting_for else ""
    print(f"recording: {recording.status.value}; consented: {', '.join(recording.consented) or 'nobody'}{waiting}")
    return 0


async def _list(args: argparse.Namespace) -> int:
    settings = get_settings()
    which = session_filter(  # refused before anything is contacted
        args.status, args.kind, args.limit, end_reason=args.end_reason, degraded=args.degraded,
        participant=args.participant, participant_key=settings.participant_id_key.get_secret_value().encode(),
    )
    client = await connect(settings)
    print(render_sessions(await find_sessions(client, which)))
    return 0


def _key_name(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a key name: use 1-64 of A-Z, a-z, 0-9, '_', '.', '-'")
    return text


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 24 * 3600:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 86400 seconds")
    return value


async def _reap(args: argparse.Namespace) -> int:
    """Run one ReaperWorkflow sweep on the reaper's task queue and print what it released as a table."""
    settings = get_settings()
    request = ReapRequest(grace_seconds=settings.reaper_grace_s if args.grace is None else args.grace, dry_run=args.dry_run)
    client = await connect(settings)
    try:
        report: ReapReport = await client.execute_workflow(
            ReaperWorkflow.run,
            request,
            id=f"sessionflow-reap-{uuid.uuid4().hex[:12]}",
            task_queue=settings.reaper_task_queue,
            # Nobody polling the queue would leave this waiting forever.
            execution_timeout=timedelta(minutes=2),
        )
    except WorkflowFailureError as e:
        raise SessionError(
            f"the sweep did not finish: {e.cause}. Is a worker (`sessionflow worker`) running with reaper task queue "
            f"{settings.reaper_task_queue!r}?"
        ) from None
    rows = [("room", name, "would release" if report.dry_run else "released") for name in report.rooms_released]
    rows += [("avatar", aid, "would release" if report.dry_run else "released") for aid in report.avatars_released]
    rows += [
        ("room" if name.startswith(ROOM_PREFIX) else "avatar", name, f"kept: younger than {request.grace_seconds:g} s")
        for name in report.skipped_young
    ]
    if rows:
        print(table(("KIND", "RESOURCE", "ACTION"), rows, indent=""))
    verb = "to release (dry run: nothing was released)" if report.dry_run else "released"
    print(
        f"rooms: {report.rooms_seen} seen, {len(report.rooms_released)} {verb}; "
        f"avatar sessions: {report.avatars_seen} seen, {len(report.avatars_released)} {verb}; "
        f"{len(report.skipped_young)} kept as too young; {len(report.errors)} errors"
    )
    for error in report.errors:
        print(f"error: {error}")
    return 1 if report.errors else 0


def _api_key(args: argparse.Namespace) -> int:
    """Make a key for the sessions HTTP API. The key is printed once and kept nowhere; only its hash is
    configured (SESSIONFLOW_API_KEYS), so a leaked configuration does not leak a key."""
    key, digest = new_api_key()
    print(f"API key (give it to the caller; shown only this once): {key}")
    print(f"add to SESSIONFLOW_API_KEYS (comma-separated) on the gateway: {args.name}:{digest}")
    return 0


async def _worker(args: argparse.Namespace) -> int:
    await run_worker(get_settings(), media=args.media)
    return 0


def _moved_to_sandbox(args: argparse.Namespace) -> int:
    """`dev` and `demo` live in the sandbox now (starters never import it): name the command that replaced them."""
    print(f"sessionflow: `sessionflow {args.command}` is now `python -m sandbox {args.command}`"
          + (" (or `make demo`)" if args.command == "demo" else ""), file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sessionflow", description="durable live-video sessions")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("dev", help="moved: python -m sandbox dev").set_defaults(sync=_moved_to_sandbox)
    w = sub.add_parser("worker", help="run a worker (sessions), or with --media the room monitors")
    w.add_argument("--media", action="store_true", help="serve the media task queue (room monitors) instead")
    w.set_defaults(run=_worker)
    sub.add_parser("demo", help="moved: python -m sandbox demo (make demo)").set_defaults(sync=_moved_to_sandbox)
    p = sub.add_parser("join", help="start (if needed) and join a session; prints the grant")
    p.add_argument("spec", help="the session spec: a JSON file or JSON text")
    p.add_argument("identity")
    p.set_defaults(run=_join)
    p = sub.add_parser("end", help="end a session and wait for its cleanup")
    p.add_argument("session_id")
    p.add_argument("--reason", default="ended from the command line")
    p.set_defaults(run=_end)
    p = sub.add_parser("extend", help="push a session's end out")
    p.add_argument("session_id")
    p.add_argument("seconds", type=int)
    p.set_defaults(run=_extend)
    p = sub.add_parser("consent", help="grant or withdraw a participant's consent to record a session")
    p.add_argument("session_id")
    p.add_argument("identity")
    p.add_argument("decision", choices=("grant", "withdraw"))
    p.set_defaults(run=_consent)
    p = sub.add_parser("show", help="a session's header, timeline, avatar billing and UI link (running or closed)")
    p.add_argument("session_id")
    p.set_defaults(run=_show)
    # Plain strings, checked by `session_filter`: a bad value is one line and exit 2, like every other mistake.
    p = sub.add_parser("list", help="find sessions by status and kind (Temporal visibility), newest first")
    p.add_argument("--status", help=f"one of: {', '.join(s.value for s in SessionStatus)}")
    p.add_argument("--kind", help=f"one of: {', '.join(k.value for k in SessionKind)}")
    p.add_argument("--limit", default="20", help=f"at most this many (1-{MAX_LIST_LIMIT}, default 20)")
    p.add_argument("--end-reason", help=f"one of: {', '.join(r.value for r in EndReason)}")
    p.add_argument("--degraded", help="yes: sessions that were degraded at some time; no: those never degraded")
    p.add_argument("--participant", metavar="IDENTITY", help="sessions with this identity on the roster (by its opaque id)")
    p.set_defaults(run=_list)
    p = sub.add_parser("api-key", help="make a key for the sessions HTTP API; prints it once and the hash to configure")
    p.add_argument("--name", default="default", type=_key_name, help="a name for the key in logs (default: default)")
    p.set_defaults(sync=_api_key)
    p = sub.add_parser("reap", help="sweep for rooms and avatars no running session owns, now; print the report")
    p.add_argument("--dry-run", action="store_true", help="release nothing, report what would be released")
    p.add_argument("--grace", type=_seconds, metavar="SECONDS", help="spare anything younger (default SESSIONFLOW_REAPER_GRACE)")
    p.set_defaults(run=_reap)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        settings = get_settings()
    except ValidationError as e:
        _error(f"the configuration (environment variables) is not valid: {summarize(e)}. "
               "For the local stack: eval \"$(python -m sandbox env)\"")
        sys.stderr.flush()
        os._exit(2)
    # One-shot commands print their result, not logs, unless a level is asked for.
    long_running = args.command == "worker"
    level = settings.log_level if long_running or "SESSIONFLOW_LOG_LEVEL" in os.environ else "WARNING"
    configure_logging(settings.log_format, level)
    try:
        rc = args.sync(args) if hasattr(args, "sync") else asyncio.run(args.run(args))
        sys.stdout.flush()  # inside the try: a closed pipe shows here, where output is buffered
    except (SessionError, TemporalUnavailable, TemporalSettingsError, CodecKeyError, UndecryptablePayload) as e:
        _error(str(e))
        rc = 2
    except RPCError as e:
        _error(f"Temporal refused the request: {e.message} ({e.status.name if e.status else 'no status'})")
        rc = 2
    except BrokenPipeError:
        # `sessionflow show ID | head -1`: the reader has what it wanted. Quiet, with the exit status of a
        # process ended by SIGPIPE, as other command-line tools in a pipeline.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        rc = 128 + 13
    except KeyboardInterrupt:
        rc = 130
    with contextlib.suppress(BrokenPipeError):
        sys.stdout.flush()
    sys.stderr.flush()
    # The Temporal runtime can crash at interpreter exit in short-lived processes (sdk-python#300).
    os._exit(rc)


def _error(message: str) -> None:
    """One line on stderr, as argparse prints a usage mistake: `sessionflow: error: ...`."""
    print(f"sessionflow: error: {' '.join(message.split())}", file=sys.stderr)
