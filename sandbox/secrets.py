"""The local stack's secrets: made at random on first run, kept in the state directory, reused afterwards.

Nothing here is in git or has a public default: the LiveKit key pair (instead of the well-known
``devkey``/``secret``, 6 bytes, below what HS256 needs), the payload encryption key, the codec server's bearer
tokens and the key of the opaque participant ids. ``<state dir>/secrets.json`` is readable by its owner only
(0600); deleting it makes new ones (histories written with the old codec key then no longer decrypt: ``make
clean`` removes both together).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path

from sandbox.processes import StackError
from workers.codec import CodecKey

SECRETS_FILE = "secrets.json"


@dataclass(frozen=True, repr=False)
class LocalSecrets:
    livekit_api_key: str
    livekit_api_secret: str
    codec_key_id: str
    codec_key: str  # base64, 32 bytes
    codec_admin_token: str
    codec_support_token: str
    participant_id_key: str  # the HMAC key of the opaque `ParticipantIds` (workflows/search_attributes.py)

    def __repr__(self) -> str:
        return "LocalSecrets(<hidden>)"

    @classmethod
    def generate(cls) -> LocalSecrets:
        key = CodecKey.generate(f"local-{secrets.token_hex(4)}")
        return cls(
            # LiveKit's own format: "API" and 12 characters; the secret is 32 random bytes, url-safe.
            livekit_api_key="API" + secrets.token_urlsafe(9),
            livekit_api_secret=secrets.token_urlsafe(32),
            codec_key_id=key.key_id,
            codec_key=base64.b64encode(key.key).decode(),
            codec_admin_token=secrets.token_urlsafe(32),
            codec_support_token=secrets.token_urlsafe(32),
            participant_id_key=secrets.token_urlsafe(32),
        )

    @property
    def codec_keys(self) -> str:
        """The value of SESSIONFLOW_CODEC_KEYS."""
        return f"{self.codec_key_id}:{self.codec_key}"


def load_or_create(state_dir: Path) -> LocalSecrets:
    """The secrets of the stack in ``state_dir``: read, or generated and written (0600) the first time. A file from
    an older version that lacks a secret added since gets it, generated and written back, so every later reader
    shares it."""
    path = state_dir / SECRETS_FILE
    try:
        data = json.loads(path.read_text())
        known = {k: v for k, v in data.items() if k in LocalSecrets.__dataclass_fields__}
        missing = {k: v for k, v in asdict(LocalSecrets.generate()).items() if k not in known}
        if not missing:
            return LocalSecrets(**known)
        _write(path, LocalSecrets(**known, **missing), replace=True)
        return LocalSecrets(**json.loads(path.read_text()))
    except FileNotFoundError:
        pass
    except (OSError, ValueError, TypeError, AttributeError) as error:
        raise StackError(f"unreadable {path}: {error}; remove it (and the Temporal database beside it)") from error
    state_dir.mkdir(parents=True, exist_ok=True)
    _write(path, LocalSecrets.generate(), replace=False)
    return LocalSecrets(**json.loads(path.read_text()))


def _write(path: Path, values: LocalSecrets, *, replace: bool) -> None:
    """Write ``values`` to ``path`` (0600) through a temporary file. Not ``replace``: two processes starting at once
    both read the secrets of whichever linked its file first."""
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(asdict(values), indent=2) + "\n")
    try:
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
