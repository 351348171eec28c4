"""The search attributes a session workflow sets, in one place.

Support finds sessions by them in the Temporal UI; the reaper finds the owner of an avatar session by
`AvatarSessionId`. Every one must be registered in the namespace with its type, or upserting it fails the
workflow task: the local stack and the tests register `SEARCH_ATTRIBUTE_TYPES`.
"""

from __future__ import annotations

from temporalio.common import SearchAttributeKey

SESSION_ID = SearchAttributeKey.for_keyword("SessionId")
SESSION_KIND = SearchAttributeKey.for_keyword("SessionKind")
SESSION_STATUS = SearchAttributeKey.for_keyword("SessionStatus")
# Every avatar session the session ever recorded, so support and the reaper find the owner of any of them
# (during a rotation two are billing at once).
AVATAR_SESSION_ID = SearchAttributeKey.for_keyword_list("AvatarSessionId")

SEARCH_ATTRIBUTES = (SESSION_ID, SESSION_KIND, SESSION_STATUS, AVATAR_SESSION_ID)
# The same, as the dev server's `--search-attribute NAME=TYPE` flags want them.
SEARCH_ATTRIBUTE_TYPES = {
    "SessionId": "Keyword", "SessionKind": "Keyword", "SessionStatus": "Keyword", "AvatarSessionId": "KeywordList"
}
