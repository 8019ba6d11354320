"""Annotator tokens and signed image URLs.

A token is 32 random bytes (URL-safe base64); the database keeps only its SHA-256, so a leaked database does
not leak working tokens. An <img> cannot send an Authorization header, so the API hands out image URLs signed
with the campaign's key: HMAC-SHA256 over (annotator, image, expiry), valid for `URL_LIFETIME_S` seconds.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

URL_LIFETIME_S = 3600


def new_token() -> str:
    return secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_signing_key() -> str:
    return secrets.token_hex(32)


def _signature(signing_key: str, annotator_id: int, image_id: int, expires: int) -> str:
    message = f"{annotator_id}:{image_id}:{expires}".encode()
    return hmac.new(bytes.fromhex(signing_key), message, hashlib.sha256).hexdigest()


def signed_image_url(signing_key: str, annotator_id: int, image_id: int, now: float | None = None) -> str:
    expires = int(now if now is not None else time.time()) + URL_LIFETIME_S
    signature = _signature(signing_key, annotator_id, image_id, expires)
    return f"/images/{image_id}?annotator={annotator_id}&expires={expires}&signature={signature}"


def url_signature_valid(signing_key: str, annotator_id: int, image_id: int, expires: int, signature: str) -> bool:
    if expires < time.time():
        return False
    return hmac.compare_digest(_signature(signing_key, annotator_id, image_id, expires), signature)
