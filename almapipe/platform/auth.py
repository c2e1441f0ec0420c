"""Who may call the gateway: bearer tokens, identities and roles (decision 0009).

A client sends `authorization: Bearer <token>` in the gRPC metadata. The gateway
keeps only the sha256 of each token (the token table, a JSON file: sha256 ->
{identity, role}) so a leaked table does not leak tokens; it rereads the file
when it changes, so a token added with `almapipe token add` works at once.

Roles are ordered: a reader may look (get, list, watch, products, trigger decisions),
a submitter may also submit, upload and cancel its own runs, a reviewer may also
record QA2 verdicts (decision 0014), an operator may cancel anyone's run and replay
trigger decisions.
Health checking and reflection are not PipelineService methods and stay open.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import threading
from dataclasses import dataclass

ROLES = {"reader": 0, "submitter": 1, "reviewer": 2, "operator": 3}

# the least role each RPC of almapipe.v1.PipelineService needs (a test checks
# that every RPC of the proto is listed: a new RPC is never open by omission)
METHOD_ROLES = {
    "SubmitRun": "submitter", "CancelRun": "submitter", "Upload": "submitter",
    "GetRun": "reader", "ListRuns": "reader", "WatchRun": "reader",
    "ListProducts": "reader", "FetchProduct": "reader",
    "ListTriggerDecisions": "reader", "RecordQA2Verdict": "reviewer", "ReplayTrigger": "operator",
}


class AuthError(Exception):
    """No valid credentials (UNAUTHENTICATED) or not allowed (PERMISSION_DENIED)."""

    def __init__(self, msg: str, denied: bool = False):
        super().__init__(msg)
        self.denied = denied


@dataclass(frozen=True)
class Identity:
    name: str
    role: str

    def may(self, role: str) -> bool:
        return ROLES[self.role] >= ROLES[role]


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return "alm_" + secrets.token_urlsafe(32)


def _write_private(path: str, doc) -> None:
    """Write JSON readable by the owner only (created 0600, replaced atomically)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)


def add_token(tokens_file: str, identity: str, role: str, token: str | None = None) -> str:
    """Add (or replace) an identity in the gateway's token table; returns its token.
    The table holds only the token's sha256."""
    if role not in ROLES:
        raise ValueError(f"role {role!r}: one of {', '.join(ROLES)}")
    token = token or new_token()
    os.makedirs(os.path.dirname(os.path.abspath(tokens_file)), mode=0o700, exist_ok=True)
    table = {}
    if os.path.exists(tokens_file):
        with open(tokens_file) as f:
            table = json.load(f)
    table = {h: e for h, e in table.items() if e["identity"] != identity}
    table[token_hash(token)] = {"identity": identity, "role": role}
    _write_private(tokens_file, table)
    return token


class TokenTable:
    """The gateway's view of the token table, reread when the file changes."""

    def __init__(self, path: str):
        self.path = path
        self._mtime = None
        self._table: dict = {}
        self._lock = threading.Lock()

    def _current(self) -> dict:
        try:
            mtime = os.stat(self.path).st_mtime_ns
        except FileNotFoundError:
            return {}
        with self._lock:
            if mtime != self._mtime:
                with open(self.path) as f:
                    self._table = json.load(f)
                self._mtime = mtime
            return self._table

    def authenticate(self, metadata) -> Identity:
        header = ""
        for k, v in metadata or ():
            if k == "authorization":
                header = v if isinstance(v, str) else v.decode()
        scheme, _, token = header.partition(" ")
        if not header:
            raise AuthError("no credentials: send 'authorization: Bearer <token>' metadata")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("authorization metadata must be 'Bearer <token>'")
        entry = self._current().get(token_hash(token.strip()))
        if entry is None:
            raise AuthError("unknown or revoked token")
        return Identity(entry["identity"], entry["role"])

    def authorize(self, metadata, method: str) -> Identity:
        who = self.authenticate(metadata)
        need = METHOD_ROLES[method]
        if not who.may(need):
            raise AuthError(f"{method} needs role {need}; {who.name} has role {who.role}", denied=True)
        return who


# ------------------------------------------------------------------ client side

def _client_interceptor(token: str):
    import grpc

    class _Details(grpc.ClientCallDetails):
        def __init__(self, d, metadata):
            self.method, self.timeout, self.credentials = d.method, d.timeout, d.credentials
            self.wait_for_ready, self.compression = d.wait_for_ready, d.compression
            self.metadata = metadata

    class BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                      grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
        """Adds the bearer token to every call (also on a plain-text loopback channel,
        where gRPC refuses call credentials)."""

        def _details(self, d):
            return _Details(d, list(d.metadata or []) + [("authorization", f"Bearer {token}")])

        def intercept_unary_unary(self, cont, d, req):
            return cont(self._details(d), req)

        def intercept_unary_stream(self, cont, d, req):
            return cont(self._details(d), req)

        def intercept_stream_unary(self, cont, d, it):
            return cont(self._details(d), it)

        def intercept_stream_stream(self, cont, d, it):
            return cont(self._details(d), it)

    return BearerToken()


def channel(cfg, token: str | None = None, options=None):
    """A gRPC channel to the gateway of cfg: TLS when cfg.tls_ca is set, and the
    bearer token (cfg.token unless given; "" sends none) on every call."""
    import grpc
    options = list(options or []) + [("grpc.max_receive_message_length", 64 << 20)]
    if cfg.tls_ca:
        with open(cfg.tls_ca, "rb") as f:
            ch = grpc.secure_channel(cfg.gateway_addr, grpc.ssl_channel_credentials(f.read()), options=options)
    else:
        ch = grpc.insecure_channel(cfg.gateway_addr, options=options)
    token = cfg.token if token is None else token
    return grpc.intercept_channel(ch, _client_interceptor(token)) if token else ch
