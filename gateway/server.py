"""The gateway's gRPC server: PipelineService, health checking and reflection."""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import signal
import tempfile

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from almapipe.config import Config
from almapipe.platform import metrics
from almapipe.platform.auth import AuthError, TokenTable
from almapipe.platform.bus import BusError
from almapipe.platform.store import ObjectStore, StoreError, s3_object_store
from almapipe.v1 import pipeline_pb2 as pb, pipeline_pb2_grpc as pb_grpc

from .coordinator import Coordinator, RequestError, TERMINAL
from .trigger import Triggers

log = logging.getLogger("almapipe.gateway")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["PipelineService"].full_name
CHUNK = 1 << 20
# an upload's parts: 16 MiB, or more where an input would need more than MAX_PARTS of them
# (S3 allows 10,000 a multipart upload)
UPLOAD_PART_BYTES = 16 << 20
MAX_PARTS = 9000
UPLOAD_PARTS_IN_FLIGHT = 4
MAX_MESSAGE = 500
MAX_RECIPE_DOC = 256 << 10
UPLOAD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def short(msg: str, limit: int = MAX_MESSAGE) -> str:
    """An error message cut to a few hundred characters: a request is never echoed at length."""
    return msg if len(msg) <= limit else msg[:limit - 20] + f"... ({len(msg)} chars)"


def run_message(run: dict) -> pb.Run:
    return pb.Run(
        run_id=run["run_id"], status=getattr(pb, "RUN_STATUS_" + run["status"]), recipe=run["recipe"],
        input_key=run["input_key"], current_stage=run["current_stage"], error=run["error"],
        context_key=run["context_key"], created_unix=run["created"], updated_unix=run["updated"],
        label=run.get("label", ""), owner=run.get("owner", ""), mous_id=run.get("mous_id", ""),
        eb_run_ids=run.get("eb_run_ids", []), parent_run_id=run.get("parent_run_id", ""),
        qa2_verdict=run.get("qa2", {}).get("verdict", ""), qa2_comment=run.get("qa2", {}).get("comment", ""),
        qa2_reviewer=run.get("qa2", {}).get("reviewer", ""), qa2_time_unix=run.get("qa2", {}).get("time", 0.0),
        trigger_decision_id=run.get("trigger_decision_id", ""),
        stages=[pb.StageState(index=s["index"], name=s["name"], service=s["service"],
                              status=getattr(pb, "STAGE_STATUS_" + s["status"]), qa_score=s["qa_score"],
                              qa_reasons=s["qa_reasons"], duration_s=s["duration_s"], attempts=s["attempts"],
                              error=s["error"], params_json=json.dumps(s["params"]))
                for s in run["stages"]])


class UploadRefused(Exception):
    """An upload that is not what its first chunk declared (the gRPC code and message)."""

    def __init__(self, code, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def _remove_quietly(store, key: str) -> None:
    try:
        store.remove(key, bucket=store.raw_bucket)
    except Exception:       # nothing was written, or S3 is away: the key names no input then
        pass


async def _drain(blocks, h, check) -> tuple:
    size = 0
    async for block in blocks:
        size += len(block)
        check(size)
        h.update(block)
    return size, h.hexdigest()


async def _stream_to_s3(store, key: str, blocks, h, check, declared: int) -> tuple:
    """Upload an async stream of blocks, declared bytes in all, to the raw bucket
    (obstore's multipart put, fed by the stream as it arrives); returns (size, sha256).
    A check that raises stops the put, whose parts S3 then drops. To a server on this machine or over TLS the parts
    are not hashed again for their signatures (store.s3_object_store): minio's put
    hashed each and copied it twice, 20 of the gateway's 24 CPU-s for a 5.5 GB EB
    (py-spy)."""
    import obstore
    size, refused = 0, None

    async def checked():
        nonlocal size, refused
        async for block in blocks:
            size += len(block)
            try:
                check(size)
            except Exception as exc:     # obstore's error would not say which check it was
                refused = exc
                raise
            h.update(block)
            yield block
    try:
        # parts of UPLOAD_PART_BYTES, larger for an input that would need over S3's 10,000
        part = max(UPLOAD_PART_BYTES, -(-declared // (MAX_PARTS * (1 << 20))) * (1 << 20))
        await obstore.put_async(s3_object_store(store.cfg, store.raw_bucket), key, checked(),
                                chunk_size=part, max_concurrency=UPLOAD_PARTS_IN_FLIGHT)
    except Exception:
        if refused is not None:
            raise refused from None
        raise
    return size, h.hexdigest()


class PipelineService(pb_grpc.PipelineServiceServicer):
    def __init__(self, coord: Coordinator, store: ObjectStore, tokens: TokenTable, triggers: Triggers | None = None):
        self.coord = coord
        self.store = store
        self.tokens = tokens
        self.triggers = triggers

    async def _auth(self, context, method: str):
        """The caller's identity, if its token allows `method`; aborts otherwise."""
        try:
            return self.tokens.authorize(context.invocation_metadata(), method)
        except AuthError as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED if exc.denied
                                else grpc.StatusCode.UNAUTHENTICATED, str(exc))

    async def _guard(self, context, coro):
        """Await coro; its errors become status codes with short messages: a request's
        fault INVALID_ARGUMENT or NOT_FOUND, a server's UNAVAILABLE, anything else
        INTERNAL (logged in full here, never UNKNOWN with a traceback's text)."""
        try:
            return await coro
        except RequestError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND if exc.not_found else grpc.StatusCode.INVALID_ARGUMENT,
                                short(str(exc)))
        except (StoreError, BusError) as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, short(str(exc)))
        except asyncio.CancelledError:
            raise
        except (grpc.aio.AbortError, UploadRefused):   # context.abort inside coro; an upload's own refusal
            raise
        except Exception as exc:
            log.exception("request failed")
            await context.abort(grpc.StatusCode.INTERNAL, short(f"{type(exc).__name__}: {exc}"))

    async def SubmitRun(self, request, context):
        who = await self._auth(context, "SubmitRun")
        recipe_doc = None
        md = dict(context.invocation_metadata() or ())
        if "x-almapipe-recipe" in md:   # a full recipe document (almapipe run --recipe-file)
            if len(md["x-almapipe-recipe"]) > MAX_RECIPE_DOC:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"x-almapipe-recipe: more than {MAX_RECIPE_DOC} bytes")
            try:
                recipe_doc = json.loads(md["x-almapipe-recipe"])
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    short(f"x-almapipe-recipe: recipe document is not JSON: {exc}"))
            if not isinstance(recipe_doc, dict):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "x-almapipe-recipe: not a JSON object")
        return run_message(await self._guard(context, self.coord.submit(request, recipe_doc, owner=who.name)))

    async def GetRun(self, request, context):
        await self._auth(context, "GetRun")
        return run_message(await self._guard(context, self.coord.load(request.run_id)))

    async def ListRuns(self, request, context):
        await self._auth(context, "ListRuns")
        runs, token = await self._guard(context, self.coord.list_runs(request.limit, request.page_token))
        return pb.ListRunsResponse(runs=[run_message(r) for r in runs], next_page_token=token)

    async def CancelRun(self, request, context):
        who = await self._auth(context, "CancelRun")
        run = await self._guard(context, self.coord.load(request.run_id))
        # a run is its submitter's: another submitter may not cancel it, an operator may
        if run.get("owner", "") != who.name and not who.may("operator"):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"run {request.run_id} belongs to {run.get('owner') or 'nobody'}; "
                                f"only its submitter or an operator may cancel it")
        return run_message(await self._guard(context, self.coord.cancel(request.run_id, by=who.name)))

    async def WatchRun(self, request, context):
        await self._auth(context, "WatchRun")
        run = await self._guard(context, self.coord.load(request.run_id))
        from nats.js.api import DeliverPolicy
        sub = await self.coord.js.subscribe(f"events.run.{run['run_id']}.>", ordered_consumer=True,
                                            deliver_policy=DeliverPolicy.ALL)
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=30)
                except (asyncio.TimeoutError, TimeoutError, Exception) as exc:
                    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)) or "timeout" in str(exc).lower():
                        current = await self.coord.load(run["run_id"])
                        if current["status"] in TERMINAL:
                            return
                        continue
                    raise
                ev = pb.StageEvent()
                ev.ParseFromString(msg.data)
                yield ev
                if ev.stage == "_run" and pb.RunStatus.Name(ev.run_status).replace("RUN_STATUS_", "") in TERMINAL:
                    return
        finally:
            await sub.unsubscribe()

    def _read_manifest(self, run_id: str) -> dict:
        key = f"runs/{run_id}/products/manifest.json"
        if not self.store.exists(key):
            raise RequestError(f"run {run_id} has no products yet (it has not finished)", not_found=True)
        return self.store.get_json(key)

    async def _manifest(self, run_id: str, context) -> dict:
        """The products map of a finished run; aborts with NOT_FOUND otherwise."""
        await self._guard(context, self.coord.load(run_id))
        return await self._guard(context, asyncio.to_thread(self._read_manifest, run_id))

    async def ListProducts(self, request, context):
        await self._auth(context, "ListProducts")
        if not 0 <= request.url_expiry_s <= 7 * 24 * 3600:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "url_expiry_s: 0 (one hour) to 604800 (7 days)")
        manifest = await self._manifest(request.run_id, context)
        expiry = request.url_expiry_s or 3600
        out = []
        for path, key in sorted(manifest.items()):
            st = self.store.client.stat_object(self.store.bucket, key)
            out.append(pb.Product(path=path, key=key, size=st.size, sha256=(st.metadata or {}).get("x-amz-meta-sha256", ""),
                                  url=self.store.url(key, expiry)))
        return pb.ListProductsResponse(products=out, bucket=self.store.bucket)

    async def FetchProduct(self, request, context):
        await self._auth(context, "FetchProduct")
        manifest = await self._manifest(request.run_id, context)
        if request.path not in manifest:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no product {request.path!r} in run {request.run_id}")
        data = await asyncio.to_thread(self.store.get_bytes, manifest[request.path])
        for off in range(0, max(len(data), 1), CHUNK):
            yield pb.ProductChunk(data=data[off:off + CHUNK], offset=off)

    async def Upload(self, request_iterator, context):
        """Stream an input into the raw bucket under inputs/<sha256[:16]>/<name> (the key
        `almapipe run` has always used), refusing more than max_upload_bytes and a
        sha256 that does not match what arrived."""
        await self._auth(context, "Upload")
        cap = self.coord.cfg.max_upload_bytes
        h = hashlib.sha256()
        name, declared, expect, size = None, 0, "", 0
        first = None
        async for chunk in request_iterator:           # the first chunk names the upload
            first = chunk
            break
        if first is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "name: no chunk arrived")
        name, declared, expect = first.name, first.size, first.sha256.lower()
        if not UPLOAD_NAME.match(name):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"name: {name[:80]!r} is not a file name (letters, digits, . _ -; at most 128)")
        if declared <= 0 or declared > cap:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"size: {declared} bytes; must be 1 to {cap} (max_upload_bytes)")
        if expect and not re.fullmatch(r"[0-9a-f]{64}", expect):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "sha256: not 64 hex digits")

        async def data():
            for chunk in [first]:
                yield chunk.data
            async for chunk in request_iterator:
                yield chunk.data

        def check(n):
            if n > declared:
                raise UploadRefused(grpc.StatusCode.INVALID_ARGUMENT, f"size: more than the declared {declared} bytes arrived")

        try:
            if expect:
                # the key is known from the declared digest: the bytes go straight into S3
                # (multipart), checked as they pass; nothing lands on the gateway's disk,
                # which a 20 GB EB would otherwise fill twice over
                key = f"inputs/{expect[:16]}/{name}"
                if await asyncio.to_thread(self.store.exists, key, self.store.raw_bucket):
                    size, digest = await _drain(data(), h, check)
                else:
                    size, digest = await self._guard(context, _stream_to_s3(self.store, key, data(), h, check, declared))
            else:
                with tempfile.TemporaryDirectory(prefix="upload-") as tmp:
                    local = os.path.join(tmp, "data")
                    with open(local, "wb") as f:
                        async for block in data():
                            size += len(block)
                            check(size)
                            h.update(block)
                            f.write(block)
                    digest = h.hexdigest()
                    key = f"inputs/{digest[:16]}/{name}"
                    if size == declared and not await asyncio.to_thread(self.store.exists, key, self.store.raw_bucket):
                        await self._guard(context, asyncio.to_thread(self.store.put_file, local, key,
                                                                     self.store.raw_bucket))
            if size != declared:
                raise UploadRefused(grpc.StatusCode.INVALID_ARGUMENT, f"size: {size} bytes arrived, {declared} declared")
            if expect and digest != expect:
                raise UploadRefused(grpc.StatusCode.DATA_LOSS, f"sha256: {digest} arrived, {expect} declared")
        except UploadRefused as exc:
            if expect:       # what was streamed under the declared key is not the input: it goes
                await asyncio.to_thread(_remove_quietly, self.store, f"inputs/{expect[:16]}/{name}")
            await context.abort(exc.code, exc.message)
        log.info("upload %s (%d bytes)", key, size)
        return pb.UploadResponse(key=key, size=size, sha256=digest)

    # state-change triggers and QA2 (decision 0014)
    async def RecordQA2Verdict(self, request, context):
        who = await self._auth(context, "RecordQA2Verdict")
        return run_message(await self._guard(context, self.triggers.record_verdict(
            request.run_id, request.verdict, request.comment, who.name)))

    async def ListTriggerDecisions(self, request, context):
        await self._auth(context, "ListTriggerDecisions")
        if len(request.mous_id) > 200:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "mous_id: at most 200 characters")
        decisions, token = await self._guard(context, self.triggers.list_decisions(
            request.limit, request.page_token, request.mous_id))
        return pb.ListTriggerDecisionsResponse(decisions=decisions, next_page_token=token)

    async def ReplayTrigger(self, request, context):
        who = await self._auth(context, "ReplayTrigger")
        return await self._guard(context, self.triggers.replay(request.decision_id, request.force, who.name))


async def serve(cfg: Config) -> None:
    metrics.serve(cfg.metrics_port)
    store = ObjectStore(cfg)
    store.ensure_buckets()
    coord = Coordinator(cfg, store)
    await coord.start()
    triggers = Triggers(cfg, coord, store)
    await triggers.start()
    server = grpc.aio.server()
    tokens = TokenTable(cfg.tokens_file)
    if not tokens._current():
        log.warning("the token table %s is empty or missing: every PipelineService call will be refused "
                    "(almapipe token add NAME --role ROLE)", cfg.tokens_file)
    pb_grpc.add_PipelineServiceServicer_to_server(PipelineService(coord, store, tokens, triggers), server)
    health_servicer = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    if cfg.tls_cert or cfg.tls_key:
        if not (cfg.tls_cert and cfg.tls_key):
            raise SystemExit("ALMAPIPE_TLS_CERT and ALMAPIPE_TLS_KEY go together: set both or neither")
        with open(cfg.tls_key, "rb") as k, open(cfg.tls_cert, "rb") as c:
            server.add_secure_port(cfg.gateway_addr, grpc.ssl_server_credentials([(k.read(), c.read())]))
    else:
        server.add_insecure_port(cfg.gateway_addr)
    await server.start()
    for name in ("", SERVICE_NAME):
        r = health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        if asyncio.iscoroutine(r):
            await r
    log.info("gateway serving on %s (%s)", cfg.gateway_addr, "TLS" if cfg.tls_cert else "plain text")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(5)
    await triggers.stop()
    await coord.stop()


def main() -> None:
    logging.basicConfig(level=os.environ.get("ALMAPIPE_LOG_LEVEL", "INFO"),
                        format="%(asctime)s gateway %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(Config.from_env()))
