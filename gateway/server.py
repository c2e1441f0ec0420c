"""The gateway's gRPC server: PipelineService, health checking and reflection."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from almapipe.config import Config
from almapipe.platform import metrics
from almapipe.platform.bus import BusError
from almapipe.platform.store import ObjectStore, StoreError
from almapipe.v1 import pipeline_pb2 as pb, pipeline_pb2_grpc as pb_grpc

from .coordinator import Coordinator, RequestError, TERMINAL

log = logging.getLogger("almapipe.gateway")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["PipelineService"].full_name
CHUNK = 1 << 20


def run_message(run: dict) -> pb.Run:
    return pb.Run(
        run_id=run["run_id"], status=getattr(pb, "RUN_STATUS_" + run["status"]), recipe=run["recipe"],
        input_key=run["input_key"], current_stage=run["current_stage"], error=run["error"],
        context_key=run["context_key"], created_unix=run["created"], updated_unix=run["updated"],
        label=run.get("label", ""), mous_id=run.get("mous_id", ""), eb_run_ids=run.get("eb_run_ids", []),
        parent_run_id=run.get("parent_run_id", ""),
        stages=[pb.StageState(index=s["index"], name=s["name"], service=s["service"],
                              status=getattr(pb, "STAGE_STATUS_" + s["status"]), qa_score=s["qa_score"],
                              qa_reasons=s["qa_reasons"], duration_s=s["duration_s"], attempts=s["attempts"],
                              error=s["error"], params_json=json.dumps(s["params"]))
                for s in run["stages"]])


class PipelineService(pb_grpc.PipelineServiceServicer):
    def __init__(self, coord: Coordinator, store: ObjectStore):
        self.coord = coord
        self.store = store

    async def _guard(self, context, coro):
        try:
            return await coro
        except RequestError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND if exc.not_found else grpc.StatusCode.INVALID_ARGUMENT,
                                str(exc))
        except (StoreError, BusError) as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))

    async def SubmitRun(self, request, context):
        recipe_doc = None
        md = dict(context.invocation_metadata() or ())
        if "x-almapipe-recipe" in md:   # a full recipe document (almapipe run --recipe-file)
            try:
                recipe_doc = json.loads(md["x-almapipe-recipe"])
            except json.JSONDecodeError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"recipe document is not JSON: {exc}")
        return run_message(await self._guard(context, self.coord.submit(request, recipe_doc)))

    async def GetRun(self, request, context):
        return run_message(await self._guard(context, self.coord.load(request.run_id)))

    async def ListRuns(self, request, context):
        runs = await self._guard(context, self.coord.list_runs(request.limit))
        return pb.ListRunsResponse(runs=[run_message(r) for r in runs])

    async def CancelRun(self, request, context):
        return run_message(await self._guard(context, self.coord.cancel(request.run_id)))

    async def WatchRun(self, request, context):
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
        manifest = await self._manifest(request.run_id, context)
        expiry = request.url_expiry_s or 3600
        out = []
        for path, key in sorted(manifest.items()):
            st = self.store.client.stat_object(self.store.bucket, key)
            out.append(pb.Product(path=path, key=key, size=st.size, sha256=(st.metadata or {}).get("x-amz-meta-sha256", ""),
                                  url=self.store.url(key, expiry)))
        return pb.ListProductsResponse(products=out, bucket=self.store.bucket)

    async def FetchProduct(self, request, context):
        manifest = await self._manifest(request.run_id, context)
        if request.path not in manifest:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no product {request.path!r} in run {request.run_id}")
        data = await asyncio.to_thread(self.store.get_bytes, manifest[request.path])
        for off in range(0, max(len(data), 1), CHUNK):
            yield pb.ProductChunk(data=data[off:off + CHUNK], offset=off)


async def serve(cfg: Config) -> None:
    metrics.serve(cfg.metrics_port)
    store = ObjectStore(cfg)
    store.ensure_buckets()
    coord = Coordinator(cfg, store)
    await coord.start()
    server = grpc.aio.server()
    pb_grpc.add_PipelineServiceServicer_to_server(PipelineService(coord, store), server)
    health_servicer = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    server.add_insecure_port(cfg.gateway_addr)
    await server.start()
    for name in ("", SERVICE_NAME):
        r = health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        if asyncio.iscoroutine(r):
            await r
    log.info("gateway serving on %s", cfg.gateway_addr)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(5)
    await coord.stop()


def main() -> None:
    logging.basicConfig(level=os.environ.get("ALMAPIPE_LOG_LEVEL", "INFO"),
                        format="%(asctime)s gateway %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(Config.from_env()))
