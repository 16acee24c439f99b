"""Who may call the serving API: bearer tokens with scopes, and a rate limit per token.

`fedmeta serve --auth FILE` reads a JSON object mapping each token to its scopes:

    {"k3J...": ["predict"], "Q9x...": ["predict", "personal", "feedback"], "ops...": ["operator"]}

* `predict`  -- answers from the ensemble (a `user_id` still picks the A/B arm, never a user's model);
* `personal` -- a `user_id` gets that user's personalized model; without the scope the id is ignored
  for personal models, so `answered_by` never reveals whether a user has one;
* `feedback` -- true labels for an answered request (they steer the weights, pruning and trials);
* `operator` -- `/routing`, `/members`, `/metrics` and the OpenAPI schema.

Only `/health` is open. Tokens are kept as SHA-256 digests and compared with `hmac.compare_digest`
against every known digest (no early exit on the first match). Without `--auth`, `fedmeta serve`
writes one fresh token per scope to a 0600 file in the per-user state directory (never the run
directory) and prints its path. Pure: no Ray, no FastAPI."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

SCOPES = ("predict", "personal", "feedback", "operator")
MIN_TOKEN_CHARS = 16


class AuthError(ValueError):
    """A token file that cannot be used: one line naming what is wrong."""


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def parse_tokens(raw: object, source: str = "--auth") -> dict[str, list[str]]:
    """{token digest: scopes} from a token file's JSON object, refusing what is not one."""
    if not isinstance(raw, dict) or not raw:
        raise AuthError(
            f"{source}: expected a JSON object mapping each token to its scopes, e.g. "
            '{"<token>": ["predict"]}'
        )
    out: dict[str, list[str]] = {}
    for token, scopes in raw.items():
        if (
            not isinstance(token, str)
            or len(token) < MIN_TOKEN_CHARS
            or not token.isprintable()
            or " " in token
        ):
            raise AuthError(
                f"{source}: a token must be at least {MIN_TOKEN_CHARS} printable characters without "
                "spaces (e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )
        if not isinstance(scopes, list) or not scopes or not all(isinstance(s, str) for s in scopes):
            raise AuthError(
                f"{source}: token …{token[-4:]}: scopes must be a non-empty list out of {list(SCOPES)}"
            )
        unknown = [s for s in scopes if s not in SCOPES]
        if unknown:
            raise AuthError(
                f"{source}: token …{token[-4:]}: unknown scope {unknown[0]!r}; the scopes are {list(SCOPES)}"
            )
        out[digest(token)] = sorted(set(scopes))
    return out


def load_tokens(path: Path) -> dict[str, list[str]]:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise AuthError(f"--auth: cannot read {path} ({e.strerror or type(e).__name__})") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise AuthError(f"--auth: {path} is not JSON (line {e.lineno}: {e.msg})") from None
    return parse_tokens(raw, f"--auth {path}")


def new_token_file(path: Path) -> dict[str, str]:
    """One fresh token per scope (the operator's also holds the others), written 0600; returns
    {scope: token}."""
    from fedmeta.sim.artifacts.durable import write_atomic

    tokens = {scope: secrets.token_urlsafe(32) for scope in SCOPES}
    grants = {tokens[s]: ([s] if s != "operator" else list(SCOPES)) for s in SCOPES}
    Path(path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(path, json.dumps(grants, indent=2), 0o600)
    return tokens


@dataclass
class Caller:
    """An authenticated caller: `id` names its token (a digest prefix, safe to log) for the
    per-token limits."""

    id: str
    scopes: frozenset[str]

    def may(self, scope: str) -> bool:
        return scope in self.scopes


def authenticate(header: str | None, tokens: dict[str, list[str]]) -> Caller | None:
    """The caller an `Authorization: Bearer <token>` header names, or None (missing, malformed or
    unknown: all a 401). Every known digest is compared, in constant time each."""
    if not header or not header.startswith("Bearer "):
        return None
    presented = digest(header[len("Bearer ") :].strip())
    found = None
    for known, scopes in tokens.items():
        if hmac.compare_digest(presented, known):
            found = Caller(known[:12], frozenset(scopes))
    return found


@dataclass
class RateLimit:
    """A token bucket per caller: `rate` requests a second on average, bursts of `burst`."""

    rate: float = 50.0
    burst: float = 100.0
    clock: object = time.monotonic
    _buckets: dict = field(default_factory=dict)

    def allow(self, caller: str) -> bool:
        now = self.clock()
        level, then = self._buckets.get(caller, (self.burst, now))
        level = min(self.burst, level + (now - then) * self.rate)
        if level < 1.0:
            self._buckets[caller] = (level, now)
            return False
        self._buckets[caller] = (level - 1.0, now)
        return True
