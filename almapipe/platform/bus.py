"""The message bus: NATS JetStream streams, consumers and the run-state KV.

* WORK   (work.<service>.<stage>): a work-queue stream of StageRequests; each
  service has one durable pull consumer, shared by all of its workers.
* EVENTS (events.run.<run_id>.<stage>.<status>): StageEvents, kept, so a
  client watching a run replays it from the start and a restarted gateway
  finds the results it had not yet handled.
* KV bucket RUNS: one entry per run, the gateway's run state.
* RUN_INDEX (almapipe.runindex): one message per run, its id, in the order runs
  were created; its sequence numbers let ListRuns page newest-first reading
  only a page (get by sequence), not every run record.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import time

import nats
from nats.js.api import ConsumerConfig, DeliverPolicy, RetentionPolicy, StreamConfig, AckPolicy
from nats.js.errors import BadRequestError, NotFoundError

from ..config import Config, stream_replicas

WORK_STREAM = "ALMAPIPE_WORK"
EVENTS_STREAM = "ALMAPIPE_EVENTS"
RUNS_KV = "ALMAPIPE_RUNS"
RUN_INDEX_STREAM = "ALMAPIPE_RUN_INDEX"
RUN_INDEX_SUBJECT = "almapipe.runindex"
RUN_EVENT_STAGE = "_run"   # stage name used for run-level events
log = logging.getLogger("almapipe.bus")


class BusError(RuntimeError):
    """NATS is unreachable or refused a request; the message says which."""


def work_subject(service: str, stage: str) -> str:
    return f"work.{service}.{stage}"


def event_subject(run_id: str, stage: str, status: str) -> str:
    return f"events.run.{run_id}.{stage}.{status}"


async def _log_error(exc) -> None:
    log.warning("NATS: %s", exc or type(exc).__name__)


async def connect(cfg: Config, name: str):
    """Connect and make sure the streams and the KV bucket exist; returns (nc, js).

    The first connection is tried a few times and then fails with BusError;
    once connected, the client reconnects for as long as it takes."""
    # each service has its own NATS user (the local stack's nats.conf); no user, no connection
    auth = {"user": cfg.nats_user, "password": cfg.nats_password} if cfg.nats_password else {}
    try:
        probe = await nats.connect(cfg.nats_url, connect_timeout=3, max_reconnect_attempts=3,
                                   reconnect_time_wait=0.5, error_cb=_log_error, **auth)
        await probe.close()
        nc = await nats.connect(cfg.nats_url, name=name, connect_timeout=3, max_reconnect_attempts=-1,
                                reconnect_time_wait=1, allow_reconnect=True, error_cb=_log_error, **auth)
    except Exception as exc:
        raise BusError(f"NATS at {cfg.nats_url} unavailable: {exc or type(exc).__name__}") from exc
    js = nc.jetstream()
    try:
        await _ensure_stream(js, StreamConfig(name=WORK_STREAM, subjects=["work.>"],
                                              retention=RetentionPolicy.WORK_QUEUE))
        await _ensure_stream(js, StreamConfig(name=EVENTS_STREAM, subjects=["events.>"],
                                              max_age=30 * 24 * 3600))
    except BaseException:
        await nc.close()     # a connection that reconnects forever would outlive the error
        raise
    return nc, js


# how long a service waits for JetStream to answer its first API requests: a NATS cluster
# that has just started (or lost a server) elects its meta leader and each stream's
# leader in seconds, and until then JetStream answers 503 or not at all
JETSTREAM_READY_S = 60.0


async def _when_ready(make, what: str):
    """await make(), again while JetStream does not answer (a timeout, 503, no responders:
    is_infrastructure_error), for up to JETSTREAM_READY_S; then BusError naming what did
    not answer. Other errors (a refusal) pass at once."""
    t_end = time.monotonic() + JETSTREAM_READY_S
    while True:
        try:
            return await make()
        except Exception as exc:
            if not is_infrastructure_error(exc):
                raise
            if time.monotonic() >= t_end:
                raise BusError(f"JetStream did not answer {what}: {exc or type(exc).__name__} "
                               f"(no leader elected on the NATS cluster?)") from exc
            log.info("JetStream not ready for %s (%s); again", what, type(exc).__name__)
            await asyncio.sleep(0.5)


async def _ensure_stream(js, config: StreamConfig) -> None:
    # replicated on a NATS cluster (ALMAPIPE_STREAM_REPLICAS); an existing stream keeps
    # the count it was created with (`nats stream edit --replicas` changes it)
    config.num_replicas = stream_replicas()

    async def info_or_add():
        try:
            await js.stream_info(config.name)
        except NotFoundError:
            try:
                await js.add_stream(config)
            except BadRequestError:
                pass  # created concurrently by another process
    await _when_ready(info_or_add, f"stream {config.name}'s info")


async def runs_kv(js):
    async def open_or_create():
        try:
            return await js.key_value(RUNS_KV)
        except NotFoundError:
            return await js.create_key_value(bucket=RUNS_KV, history=5, replicas=stream_replicas())
    return await _when_ready(open_or_create, f"the KV bucket {RUNS_KV}")


def work_consumer_name(service: str) -> str:
    """The durable consumer a service's workers share (deploy/k8s/ scales on its lag)."""
    return f"worker-{service}"


async def run_index(js) -> None:
    await _ensure_stream(js, StreamConfig(name=RUN_INDEX_STREAM, subjects=[RUN_INDEX_SUBJECT]))


async def work_consumer(js, service: str, cfg: Config):
    """The durable pull subscription of a service's workers."""
    return await js.pull_subscribe(
        f"work.{service}.>", durable=work_consumer_name(service), stream=WORK_STREAM,
        config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, max_deliver=cfg.max_deliver,
                              ack_wait=cfg.ack_wait_s, max_ack_pending=64))


async def gateway_event_consumer(js):
    return await js.pull_subscribe(
        "events.run.>", durable="gateway", stream=EVENTS_STREAM,
        config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL,
                              ack_wait=30, max_deliver=20))


def is_infrastructure_error(exc: BaseException) -> bool:
    """True for an error of the servers, not of the stage: S3 refusing connections or
    answering 5xx, NATS away or timing out. Those are retried without counting as a
    failed attempt of the stage (an outage of minutes must not fail a run); a missing
    object (NoSuchKey) or a stage's own exception is not one of them."""
    import urllib3.exceptions as u3
    from minio.error import S3Error, ServerError
    from nats import errors as nerr
    from nats.js.errors import ServiceUnavailableError
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (ConnectionError, TimeoutError, asyncio.TimeoutError, u3.MaxRetryError,
                            u3.NewConnectionError, u3.ProtocolError, u3.ReadTimeoutError, ServerError,
                            nerr.TimeoutError, nerr.ConnectionClosedError, nerr.NoServersError,
                            nerr.NoRespondersError, nerr.OutboundBufferLimitError, nerr.ConnectionReconnectingError,
                            nerr.StaleConnectionError, nerr.FlushTimeoutError, ServiceUnavailableError)):
            return True
        if isinstance(exc, S3Error) and exc.code in ("InternalError", "ServiceUnavailable", "SlowDown",
                                                     "RequestTimeout", "XMinioServerNotInitialized"):
            return True
        if _is_object_store_outage(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


# how obstore (the visibility store's S3 client, under zarr) words an answer of 5xx or
# no answer, once its own retries are spent: its GenericError carries the HTTP status
# or the connection error only in its text
_OBSTORE_OUTAGE = re.compile(r"status: 5\d\d|error sending request|tcp connect error|connection (refused|reset|closed)"
                             r"|<Code>(InternalError|ServiceUnavailable|SlowDown|RequestTimeout)</Code>", re.I)


def _is_object_store_outage(exc: BaseException) -> bool:
    try:
        from obstore.exceptions import GenericError
    except ImportError:
        return False
    return isinstance(exc, GenericError) and bool(_OBSTORE_OUTAGE.search(str(exc)))


async def publish_retrying(js, subject: str, data: bytes, msg_id: str, what: str,
                           give_up_s: float | None = None, stopping=lambda: False) -> None:
    """Publish to a stream until JetStream acknowledges it, with back-off (0.5 s doubling
    to 15 s): through a NATS restart the message is not lost. msg_id makes a publish
    that landed but whose ack was lost harmless (JetStream drops the duplicate).
    give_up_s: re-raise after that long (None: never)."""
    t0, wait = time.monotonic(), 0.5
    while True:
        try:
            await js.publish(subject, data, headers={"Nats-Msg-Id": msg_id})
            return
        except Exception as exc:
            if not is_infrastructure_error(exc) or stopping() or \
                    (give_up_s is not None and time.monotonic() - t0 > give_up_s):
                raise
            log.warning("publishing %s failed (%s); retrying in %.1f s", what, type(exc).__name__, wait)
            await asyncio.sleep(wait)
            wait = min(wait * 2, 15.0)


async def consume(sub, handle, what: str, nak_delay: float) -> None:
    """Fetch from a durable pull consumer until cancelled: each message handled by
    handle(msg), then acknowledged. A message whose handling fails is nak'ed, so it comes
    back after nak_delay s (or, with NATS away, after the ack wait); a fetch that fails
    (NATS away) is tried again a second later."""
    while True:
        try:
            msgs = await sub.fetch(10, timeout=1.0)
        except (asyncio.TimeoutError, TimeoutError):
            continue
        except asyncio.CancelledError:
            return
        except Exception as exc:
            log.warning("%s: fetch failed: %s", what, exc)
            await asyncio.sleep(1)
            continue
        for msg in msgs:
            try:
                await handle(msg)
                await msg.ack()
            except Exception:
                log.exception("%s: %s not handled; will be redelivered", what, msg.subject)
                try:
                    await msg.nak(delay=nak_delay)
                except Exception as exc:
                    log.warning("nak of %s failed: %s", msg.subject, exc)


async def kv_values(kv) -> list:
    """Every live value of a KV bucket, in one pass: for start-up and maintenance, never
    per request.

    The watcher's "initial values delivered" marker is not trusted: it is sent at the first
    message whose pending count reads 0, and under concurrent writes that count can read 0
    before the replay is over (nats-io/nats.py#995), which lost a run in gc. Instead the
    stream's last sequence is read once the watcher's consumer exists: that consumer
    delivers, in stream order, the latest message of each key as it was at its creation and
    every message written since, so once a message at or past that sequence has arrived,
    every key written before the call has been seen. (Read before the watcher, the
    sequence would let a key rewritten in between arrive after the stop.)"""
    latest: dict = {}
    watcher = await kv.watchall()           # deletes too: one may be the last message
    try:
        state = (await kv.status()).stream_info.state
        seen = 0
        while state.messages and seen < state.last_seq:
            entry = await watcher.updates(timeout=10)
            if entry is None:               # the marker; go on to the sequence read
                continue
            seen = max(seen, entry.revision)
            latest[entry.key] = entry
    finally:
        await watcher.stop()
    return [json.loads(e.value) for e in latest.values()
            if e.value and e.operation not in ("DEL", "PURGE")]
