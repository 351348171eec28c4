"""LiveAvatar emulator: a local fake of the LiveAvatar HTTP API (reference/liveavatar-api.md) for dev and tests.

Run it with ``python -m sandbox.emulator --host 127.0.0.1 --port 8090``, build it with ``create_app(config)``, or run
it inside the current event loop with ``async with serve(config) as base_url:`` (tests, the dev stack).

Behaviour: ``/v1/sessions/token|start|stop|keep-alive``, ``GET /v1/sessions[?type=active|historic]``,
``GET /v1/sessions/{id}`` (``DELETE`` → 405) and ``GET /v1/users/credits`` with the reference's auth rules, status
codes (201 on start, FastAPI-shaped 422, 404 ``Session not found`` for unknown/ended sessions), ``{code, data,
message}`` envelope (``code`` 1000 on success), and a fixed 1-second rate-limit window per caller x endpoint (429 +
``Retry-After``; ``X-RateLimit-Reset`` on every ``/v1`` response). On ``/start`` of a LITE session with
``livekit_config`` the avatar really joins that LiveKit room with the given token (identity = the token's ``sub``)
and publishes synthetic video and audio; ``/start`` answers once it is in, or 500 if it cannot join or the token
lacks ``canPublishData``. When the session ends (stop, ``IDLE_TIMEOUT``, ``MAX_DURATION_REACHED`` — also the
sandbox length —, ``ZOMBIE_SESSION_REAP`` after the avatar was alone in its room, ``NO_CREDITS``) it becomes
historic with ``end_at``/``end_reason`` and the avatar leaves the room.

Other choices where the reference is [unconfirmed]: ``max_session_duration`` above the plan cap is clamped; start
of a started session → 409; start with too little credit → 402; more active sessions than allowed → 400
"Concurrent session limit reached"; API key without ``session_id`` on stop/keep-alive → 400; a failed start leaves
the session unstarted (retryable); ``mode`` must be ``LITE`` or ``FULL`` (the old ``CUSTOM`` is refused).

Configuration (``EmulatorConfig``, env vars): ``EMULATOR_API_KEY`` or ``LIVEAVATAR_API_KEY`` (default
``emulator-dev-key``), ``EMULATOR_IDLE_TIMEOUT_S`` (300), ``EMULATOR_ZOMBIE_REAP_S`` (200),
``EMULATOR_SANDBOX_SESSION_S`` (60), ``EMULATOR_MAX_SESSION_DURATION_S`` (3600, cap and default),
``EMULATOR_CREDITS`` (1000), ``EMULATOR_BILLING_PERIOD_S`` (60), ``EMULATOR_MAX_CONCURRENT_SESSIONS`` (20),
``EMULATOR_RATE_LIMIT_PER_S`` (20), ``EMULATOR_AVATAR_JOIN_TIMEOUT_S`` (10), ``EMULATOR_TICK_S`` (0.1).

Control endpoints (no auth; loopback dev tool). Endpoint names: ``token``, ``start``, ``stop``, ``keep-alive``,
``list``, ``get``, ``credits`` or ``*`` (every ``/v1`` endpoint); all answer in the envelope:

- ``POST /_control/faults`` ``{"endpoint", "status", "count": 1, "retry_after"?, "message"?}``: the next ``count``
  calls answer ``status`` (429 always carries ``Retry-After``, default 1) without any effect.
- ``POST /_control/latency`` ``{"endpoint", "seconds", "phase": "before"|"after"}``: delay every call until reset;
  ``after`` runs the handler first (the effect happens, the answer is late).
- ``POST /_control/hang`` ``{"endpoint", "count": 1}``: the next ``count`` calls never answer until reset (then
  503, no effect).
- ``POST /_control/reset`` ``{"end_sessions": false, "reason": "SERVER_ERROR"}``: clear faults, latency, hangs and
  rate-limit counters; optionally end every live session.
- ``GET /_control/sessions``: every session with state, room name, avatar identity and presence, and the balance.
- ``POST /_control/sessions/{id}/crash``: the avatar leaves the room, the session stays active.
- ``POST /_control/sessions/{id}/freeze``: the avatar's video stops (the track stays published).
- ``POST /_control/sessions/{id}/silence`` ``{"mode": "quiet"|"mute"|"unpublish"}``: the avatar's sound stops; its
  video goes on. ``quiet``: it sends silence, as a listening avatar does (a few packets a second, Opus DTX);
  ``mute``: its audio track stays published but muted, so no packet reaches the room; ``unpublish``: no audio track.
- ``POST /_control/sessions/{id}/end`` ``{"reason"}``: end a session with any end reason (e.g. ``AVATAR_DELETED``).

Not implemented: the LITE ``ws_url`` WebSocket (start still returns ``ws_url``), avatars, voices, transcripts.
"""

from .app import create_app
from .config import EmulatorConfig
from .server import serve

__all__ = ["EmulatorConfig", "create_app", "serve"]
