"""The HTTP gateway: receives LiveKit webhooks and hands them to the owning session as signals.

A webhook is accepted only with a valid LiveKit signature over the exact raw body. Events for rooms that are
not ours, for the engine's own hidden participants, and duplicate-identity kicks are ignored. The answer is
a fast 2xx once the signal is recorded by Temporal (a durable hand-off); webhooks are hints, deduplicated by
event id in the workflow.

    python -m starters.gateway --host 127.0.0.1 --port 8099
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import structlog
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from livekit import api
from livekit.protocol import models as lk_models
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from config.settings import Settings, get_settings
from starters.api import install as install_sessions_api
from starters.codec_server import codec_router
from workers.logging import configure_logging
from workers.temporal import connect
from workflows.models import ROOM_PREFIX, RoomEvent, RoomEventKind
from workflows.session import SessionWorkflow

log = structlog.get_logger("sessionflow.gateway")

_KINDS = {
    "participant_joined": RoomEventKind.PARTICIPANT_JOINED,
    "participant_left": RoomEventKind.PARTICIPANT_LEFT,
    "participant_connection_aborted": RoomEventKind.PARTICIPANT_LEFT,
    "room_finished": RoomEventKind.ROOM_FINISHED,
}


def session_workflow_id(room: str) -> str | None:
    """The workflow of the session whose room is `room`, or None when it is no session's room (another app's).

    A room's name is its session's workflow id: `session-<deployment>-<id>` (this deployment's sessions), and
    `session-<id>` for sessions started before deployments existed, which must go on hearing of their room
    while they run. A room of another deployment maps to a workflow this namespace does not have (the signal
    finds nothing and the event is acknowledged); on a shared LiveKit project a room name is one room, so a
    workflow that does answer to it owns that very room.
    """
    return room if room.startswith(ROOM_PREFIX) else None


def room_event_from_webhook(event: api.WebhookEvent) -> RoomEvent | None:
    """The session signal for a LiveKit webhook event, or None when no session need hear of it."""
    kind = _KINDS.get(event.event)
    if kind is None or session_workflow_id(event.room.name) is None:
        return None
    identity = event.participant.identity or None
    if kind is not RoomEventKind.ROOM_FINISHED:
        if identity is None or identity.startswith("monitor-"):
            return None
        # A participant replaced by a newer connection of the same identity has not left (livekit#4620).
        if event.participant.disconnect_reason == lk_models.DisconnectReason.DUPLICATE_IDENTITY:
            return None
    if kind is RoomEventKind.ROOM_FINISHED:
        return RoomEvent(event_id=event.id, kind=kind)
    # The connection and the time let the session drop a webhook that arrives after later news (the monitor's).
    at = datetime.fromtimestamp(event.created_at, UTC) if event.created_at else None
    return RoomEvent(event_id=event.id, kind=kind, identity=identity, sid=event.participant.sid or None, at=at)


def create_app(settings: Settings, client: Client | None = None) -> FastAPI:
    receiver = api.WebhookReceiver(
        api.TokenVerifier(settings.livekit_api_key, settings.livekit_api_secret.get_secret_value())
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.temporal = client or await connect(settings)
        yield

    app = FastAPI(title="sessionflow gateway", lifespan=lifespan)
    app.include_router(codec_router(settings))  # /codec/encode, /codec/decode for the Temporal UI and CLI
    install_sessions_api(app, settings)
    if client is not None:
        app.state.temporal = client  # also for in-process use without a lifespan (tests on an ASGI transport)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/livekit/webhook")
    async def livekit_webhook(request: Request) -> dict[str, str]:
        try:
            body = (await request.body()).decode()
        except UnicodeDecodeError:
            # Never signed by LiveKit (it sends JSON): the sender's mistake, not ours.
            raise HTTPException(status_code=400, detail="the webhook body is not UTF-8 text") from None
        try:
            # The header is the raw JWT, without "Bearer ".
            event = receiver.receive(body, request.headers.get("Authorization", ""))
        except Exception as e:
            log.warning("webhook rejected", reason=str(e) or type(e).__name__)
            raise HTTPException(status_code=401, detail="invalid webhook signature") from None
        room_event = room_event_from_webhook(event)
        workflow_id = session_workflow_id(event.room.name)
        if room_event is None or workflow_id is None:
            return {"status": "ignored"}
        handle = request.app.state.temporal.get_workflow_handle(workflow_id)
        try:
            await handle.signal(SessionWorkflow.room_event, room_event)
        except RPCError as e:
            if e.status == RPCStatusCode.NOT_FOUND:
                # The session has closed (our own delete_room echoes back as room_finished): nothing to tell.
                return {"status": "session closed"}
            log.error("could not signal session", workflow_id=workflow_id, error=str(e))
            # 5xx: LiveKit retries for a short while.
            raise HTTPException(status_code=503, detail="could not hand the event to the session") from None
        log.info("room event", workflow_id=workflow_id, kind=room_event.kind.value, identity=room_event.identity)
        return {"status": "delivered"}

    return app


def main() -> None:
    settings = get_settings()
    parser = argparse.ArgumentParser(description="sessionflow gateway (LiveKit webhook receiver)")
    parser.add_argument("--host", default=settings.gateway_host)
    parser.add_argument("--port", type=int, default=settings.gateway_port)
    args = parser.parse_args()
    configure_logging(settings.log_format, settings.log_level)
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_config=None, access_log=False)


if __name__ == "__main__":
    main()
