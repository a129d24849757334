"""Request secrets at rest: a job's Hub token and webhook secret, Fernet-encrypted.

A merge request may carry secrets (`hub_token`, `webhook.secret`). The API splits them out
of the spec before storing it: the stored spec keeps only the marker `"***"` where a secret
was, and `jobs.secrets` holds a Fernet ciphertext (AES-128-CBC + HMAC-SHA256) of
`{"hub_token": ..., "webhook_secret": ...}`. The worker decrypts it with the same key
(`load_job_secrets`); nothing else ever sees the plaintext.

The key: `CRUCIBLE_SECRETS_KEY` (urlsafe base64 of 32 bytes, `Fernet.generate_key()`;
several keys separated by commas rotate: the first encrypts, every one decrypts). Without
it, embedded mode (the SQLite job store, so the API and worker share one data folder)
generates one once at `<data dir>/secrets.key`, mode 0600. With a database server the API
and workers may run on different hosts, so the key must be given: `check_secrets_key`
makes that a startup error. Torch-free.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from crucible.errors import CrucibleError
from crucible.settings import Settings
from crucible.spec import REDACTED, MergeSpec

if TYPE_CHECKING:
    from crucible.store import JobStore

__all__ = ["REDACTED", "JobSecrets", "SecretsKeyError", "load_job_secrets"]

KEY_FILE = "secrets.key"


class SecretsKeyError(RuntimeError):
    """The secrets key is missing or malformed: the process cannot start."""


@dataclass(frozen=True)
class JobSecrets:
    """A job's secrets in clear, for the worker's own use only. repr never shows them."""

    hub_token: str | None = None
    webhook_secret: str | None = None

    def __repr__(self) -> str:
        def state(value: str | None) -> str:
            return "None" if value is None else "<set>"

        return (
            f"JobSecrets(hub_token={state(self.hub_token)}, "
            f"webhook_secret={state(self.webhook_secret)})"
        )

    __str__ = __repr__

    def __bool__(self) -> bool:
        return self.hub_token is not None or self.webhook_secret is not None

    @classmethod
    def from_spec(cls, spec: MergeSpec) -> JobSecrets:
        """The secrets a request carries; the redaction marker counts as none."""

        def value(secret: Any) -> str | None:
            if secret is None:
                return None
            plain = secret.get_secret_value()
            return None if plain == REDACTED else plain

        webhook = spec.webhook
        return cls(
            hub_token=value(spec.hub_token),
            webhook_secret=value(webhook.secret) if webhook is not None else None,
        )


def _is_embedded(settings: Settings) -> bool:
    return settings.resolved_database_url.startswith("sqlite")


def _key_file(settings: Settings) -> Path:
    return settings.data_root / KEY_FILE


def _generated_key(settings: Settings) -> bytes:
    """The embedded key file, created once (O_EXCL: two processes starting together agree
    on the first one's key) with mode 0600 from the start."""
    path = _key_file(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, Fernet.generate_key())
            os.fsync(fd)
        finally:
            os.close(fd)
    for _ in range(50):  # the creator may not have written yet
        key = path.read_bytes().strip()
        if key:
            return key
        time.sleep(0.02)
    raise SecretsKeyError(f"{path} is empty: remove it to generate a new key")


def _keys(settings: Settings) -> list[bytes]:
    if settings.secrets_key is not None:
        raw = settings.secrets_key.get_secret_value()
        keys = [k.strip().encode() for k in raw.split(",") if k.strip()]
        if keys:
            return keys
    if not _is_embedded(settings):
        raise SecretsKeyError(
            "CRUCIBLE_SECRETS_KEY is not set. With a database server the API and the workers "
            "must share one key to encrypt request secrets at rest; generate one with "
            '`python -c "from cryptography.fernet import Fernet; '
            'print(Fernet.generate_key().decode())"` and give it to every process.'
        )
    return [_generated_key(settings)]


def fernet(settings: Settings) -> MultiFernet:
    """The cipher: the first key encrypts, every key decrypts (key rotation)."""
    try:
        return MultiFernet([Fernet(k) for k in _keys(settings)])
    except (ValueError, TypeError):
        # Fernet's message names no key material; ours neither.
        raise SecretsKeyError(
            "CRUCIBLE_SECRETS_KEY is malformed: each key must be 32 bytes in urlsafe base64 "
            "(Fernet.generate_key())"
        ) from None


def check_secrets_key(settings: Settings) -> None:
    """Fail at startup (API and worker) rather than at the first request with a secret:
    a malformed key, or none with a database server. Creates nothing (embedded mode makes
    its key file on first use)."""
    if settings.secrets_key is not None or not _is_embedded(settings):
        fernet(settings)


def encrypt_secrets(secrets: JobSecrets, settings: Settings) -> str | None:
    """The ciphertext to store in jobs.secrets; None when there is nothing secret."""
    if not secrets:
        return None
    doc = {"hub_token": secrets.hub_token, "webhook_secret": secrets.webhook_secret}
    return fernet(settings).encrypt(json.dumps(doc).encode()).decode("ascii")


def decrypt_secrets(ciphertext: str | None, settings: Settings) -> JobSecrets:
    if not ciphertext:
        return JobSecrets()
    try:
        doc = json.loads(fernet(settings).decrypt(ciphertext.encode("ascii")))
    except (InvalidToken, ValueError):
        raise CrucibleError(
            "secrets_unreadable",
            "the job's secrets cannot be decrypted with this process's CRUCIBLE_SECRETS_KEY "
            "(the API and the workers must share the key)",
        ) from None
    return JobSecrets(hub_token=doc.get("hub_token"), webhook_secret=doc.get("webhook_secret"))


def load_job_secrets(store: JobStore, job_id: str, settings: Settings) -> JobSecrets:
    """The job's secrets in clear (the worker's side of the split the API made)."""
    return decrypt_secrets(store.get_job_secrets(job_id), settings)
