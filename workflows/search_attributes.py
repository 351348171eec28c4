"""The search attributes a session workflow sets, in one place.

Support finds sessions by them in the Temporal UI; the reaper finds the owner of an avatar session by
`AvatarSessionId`. Every one must be registered in the namespace with its type, or upserting it fails the
workflow task: the local stack and the tests register `SEARCH_ATTRIBUTE_TYPES`.

Who sets what: the starter sets those known before the session runs (`SessionId`, `SessionKind`, the first
`SessionStatus`, `ParticipantIds` of the roster, `Deployment`); the workflow upserts the ones that change as it
runs (`SessionStatus`, `AvatarSessionId`, `SessionDegraded`, `SessionEndReason`, `AvatarBilledSeconds`), from
the machine's `PublishStatus` and `PublishAvatarSessions` commands. Search attributes are indexed in plain
text and kept after the session: none may hold personal data, so participants appear only as opaque ids.
"""

from __future__ import annotations

import hashlib
import hmac

from temporalio.common import SearchAttributeKey

SESSION_ID = SearchAttributeKey.for_keyword("SessionId")
SESSION_KIND = SearchAttributeKey.for_keyword("SessionKind")
SESSION_STATUS = SearchAttributeKey.for_keyword("SessionStatus")
# Every avatar session the session ever recorded, so support and the reaper find the owner of any of them
# (during a rotation two are billing at once).
AVATAR_SESSION_ID = SearchAttributeKey.for_keyword_list("AvatarSessionId")
# Why the session ended (an `EndReason` value), set once it decides to end.
SESSION_END_REASON = SearchAttributeKey.for_keyword("SessionEndReason")
# True once the session has been degraded at any time (an avatar lost, someone reconnecting): it stays true
# after recovery, so support finds the sessions that had trouble; `SessionStatus = "degraded"` is the now.
SESSION_DEGRADED = SearchAttributeKey.for_bool("SessionDegraded")
# `participant_id` of each identity on the roster: find every session of one person without naming them.
PARTICIPANT_IDS = SearchAttributeKey.for_keyword_list("ParticipantIds")
# Seconds billed across all the session's avatar sessions; final once the session has closed.
AVATAR_BILLED_SECONDS = SearchAttributeKey.for_float("AvatarBilledSeconds")
# The deployment that started the session (settings `SESSIONFLOW_DEPLOYMENT`).
DEPLOYMENT = SearchAttributeKey.for_keyword("Deployment")

SEARCH_ATTRIBUTES = (
    SESSION_ID, SESSION_KIND, SESSION_STATUS, AVATAR_SESSION_ID,
    SESSION_END_REASON, SESSION_DEGRADED, PARTICIPANT_IDS, AVATAR_BILLED_SECONDS, DEPLOYMENT,
)
# The same, as the dev server's `--search-attribute NAME=TYPE` flags want them.
SEARCH_ATTRIBUTE_TYPES = {
    "SessionId": "Keyword", "SessionKind": "Keyword", "SessionStatus": "Keyword", "AvatarSessionId": "KeywordList",
    "SessionEndReason": "Keyword", "SessionDegraded": "Bool", "ParticipantIds": "KeywordList",
    "AvatarBilledSeconds": "Double", "Deployment": "Keyword",
}

PARTICIPANT_ID_PREFIX = "p-"
PARTICIPANT_ID_HEX = 24  # 96 bits: no collisions among a deployment's participants, short enough to paste


def participant_id(identity: str, key: bytes) -> str:
    """The opaque id under which `identity` is searchable: a keyed hash (HMAC-SHA256), so an id cannot be
    turned back into the identity, nor computed from a guessed identity, without the deployment's key. The
    starter and `sessionflow list --participant` compute it alike (settings `SESSIONFLOW_PARTICIPANT_ID_KEY`)."""
    digest = hmac.new(key, identity.encode(), hashlib.sha256).hexdigest()
    return PARTICIPANT_ID_PREFIX + digest[:PARTICIPANT_ID_HEX]
