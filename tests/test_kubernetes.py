"""The Kubernetes manifests (docs/deploy/kubernetes): every resource validates offline against the
Kubernetes OpenAPI schemas (kubernetes-validate ships them), strictly (unknown fields are errors), for
the oldest and the newest Kubernetes version tested; the kustomizations render (``kubectl kustomize``,
where kubectl is installed) and what they render validates too; and the manifests agree with pykvshm
itself: the pool named in the connector configuration is the pool the DaemonSet creates and exports,
every ``pykvshm`` command line parses with the real CLI parser, the connector's extra configuration has
only keys the connector accepts, the router's flags exist, Services select pods that expose the named
ports, and no container asks for something the API server refuses.

Skipped only when kubernetes-validate is missing and PYKVSHM_REQUIRE_K8S is unset (CI sets it).
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

if os.environ.get("PYKVSHM_REQUIRE_K8S"):
    import kubernetes_validate  # CI installs the test extra: a missing package is a failure
else:
    kubernetes_validate = pytest.importorskip("kubernetes_validate",
                                              reason="pip install kubernetes-validate (in pykvshm[test])")
import yaml

from pykvshm.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "docs" / "deploy" / "kubernetes"
BASE = DEPLOY / "base"
OVERLAYS = sorted(p for p in (DEPLOY / "overlays").iterdir() if (p / "kustomization.yaml").exists())
ROUTER = ROOT / "examples" / "vllm_disagg" / "router.py"


def connector_keys() -> set[str]:
    """The kv_connector_extra_config keys PykvshmConnector accepts (EXTRA_DEFAULTS), read from its
    source: importing the connector package needs vLLM, which these tests do not."""
    import ast

    tree = ast.parse((ROOT / "pykvshm" / "integrations" / "vllm" / "config.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "EXTRA_DEFAULTS":
            return set(ast.literal_eval(node.value))
    raise AssertionError("EXTRA_DEFAULTS not found in pykvshm/integrations/vllm/config.py")


VERSIONS = ("1.30.0", kubernetes_validate.latest_version())  # oldest Kubernetes still in wide use; newest known


def load(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def base_resources() -> list[dict[str, Any]]:
    kust = load(BASE / "kustomization.yaml")[0]
    return [doc for f in kust["resources"] for doc in load(BASE / f)]


def render(folder: Path) -> list[dict[str, Any]]:
    r = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def validate(doc: dict[str, Any]) -> None:
    for version in VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            raise AssertionError(f"{doc['kind']}/{doc['metadata']['name']} is invalid for Kubernetes {version}: "
                                 f"{e.message} at {'.'.join(map(str, e.path))}") from None


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(resource name, pod template labels, pod spec) of every workload."""
    for d in docs:
        if d["kind"] in ("Deployment", "DaemonSet", "StatefulSet", "Job"):
            t = d["spec"]["template"]
            yield d["metadata"]["name"], t["metadata"].get("labels", {}), t["spec"]


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def config_map(docs: list[dict[str, Any]]) -> dict[str, str]:
    [cm] = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "pykvshm-config"]
    return dict(cm["data"])


def expand(word: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command and args."""
    for k, v in env.items():
        word = word.replace(f"$({k})", v)
    return word


def command_lines(argv: list[str], env: dict[str, str]) -> list[list[str]]:
    """The command lines a container runs: its argv, or each simple command of a ``sh -c`` script."""
    if argv[:2] != ["/bin/sh", "-c"]:
        return [argv]
    script = argv[2]
    for k in sorted(env, key=len, reverse=True):  # $POOL_GEOMETRY before $POOL
        script = script.replace(f"${{{k}}}", env[k]).replace(f"${k}", env[k])
    words = shlex.split(script)
    lines, cur = [], []
    for w in words:
        if w in ("||", "&&", "do", "done", "until", "while", "then") or w.startswith(">"):
            lines.append(cur)
            cur = []
        elif w.endswith(";"):
            cur.append(w[:-1])
            lines.append(cur)
            cur = []
        else:
            cur.append(w)
    lines.append(cur)
    return [line for line in lines if line]


@functools.lru_cache(maxsize=1)
def all_variants() -> list[tuple[str, list[dict[str, Any]]]]:
    variants = [("base files", base_resources())]
    if shutil.which("kubectl"):
        variants += [(f"rendered {p.relative_to(DEPLOY)}", render(p)) for p in [BASE, *OVERLAYS]]
    return variants


def test_base_files_validate_against_the_kubernetes_schemas() -> None:
    docs = base_resources()
    assert {d["kind"] for d in docs} >= {"Namespace", "ConfigMap", "DaemonSet", "Deployment", "Service"}
    for doc in docs:
        validate(doc)


def test_kustomizations_list_what_exists() -> None:
    listed = set(load(BASE / "kustomization.yaml")[0]["resources"])
    present = {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present, "base/kustomization.yaml must list every manifest in base/ (and nothing else)"
    assert OVERLAYS, "no overlay found"
    for overlay in OVERLAYS:
        kust = load(overlay / "kustomization.yaml")[0]
        for ref in [*kust.get("resources", []), *(p["path"] for p in kust.get("patches", []))]:
            assert (overlay / ref).exists(), f"{overlay.name}: {ref} does not exist"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) is not installed")
@pytest.mark.parametrize("folder", [BASE, *OVERLAYS], ids=lambda p: str(p.relative_to(DEPLOY)))
def test_rendered_kustomizations_validate(folder: Path) -> None:
    docs = render(folder)
    for doc in docs:
        validate(doc)
        assert doc["metadata"].get("namespace", "pykvshm") == "pykvshm"
    if folder.name == "devdax":
        # the device is the pool: every pod maps it, nothing uses the /dev/shm folder; one Job creates it
        assert any(d["kind"] == "Job" for d in docs)
        volumes = [v for _, _, spec in pod_specs(docs) for v in spec.get("volumes", []) if v["name"] == "pool"]
        assert volumes and all(v["hostPath"] == {"path": "/dev/dax0.0", "type": "CharDevice"} for v in volumes)
        assert config_map(docs)["COHERENCE"] == "noncoherent"


@pytest.mark.parametrize("variant", range(3), ids=["base-files", "rendered-base", "rendered-devdax"])
def test_manifests_agree_with_pykvshm(variant: int) -> None:
    variants = all_variants()
    if variant >= len(variants):
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    _, docs = variants[variant]
    env = config_map(docs)
    pool = env["POOL"]
    parser = build_parser()

    # The pool the node creates, the pool every engine opens and the pool the exporter serves are one.
    for key in ("PREFILL_KV_CONFIG", "DECODE_KV_CONFIG"):
        cfg = json.loads(env[key])
        assert cfg["kv_connector"] == "PykvshmConnector" and cfg["kv_connector_module_path"] == "pykvshm.integrations.vllm"
        assert cfg["kv_role"] == ("kv_producer" if key.startswith("PREFILL") else "kv_consumer")
        extra = cfg["kv_connector_extra_config"]
        assert set(extra) <= connector_keys(), f"{key}: keys the connector refuses: {set(extra) - connector_keys()}"
        assert extra["pool"] == pool and extra["create"] == "open"
    create = parser.parse_args(["create", pool, *shlex.split(env["POOL_GEOMETRY"]), "--coherence", env["COHERENCE"]])
    assert create.layers > 0 and create.kv_heads > 0 and create.head_dim > 0

    router_help = subprocess.run([sys.executable, str(ROUTER), "--help"], capture_output=True, text=True, timeout=60)
    assert router_help.returncode == 0, router_help.stderr
    saw = set()
    for name, labels, spec in pod_specs(docs):
        mounts = {}
        for c in containers(spec):
            argv = [expand(w, env) for w in [*c.get("command", []), *c.get("args", [])]]
            for line in command_lines(argv, env):
                if line[:1] == ["pykvshm"]:
                    args = parser.parse_args(line[1:])  # SystemExit on a flag the CLI does not have
                    saw.add(args.command)
                    if args.command == "exporter":
                        assert args.pool == [pool] and args.host == "0.0.0.0"
                    elif args.command in ("info", "create"):
                        assert args.name == pool
                    if args.command == "create":
                        assert args.coherence == env["COHERENCE"] and args.mode == "644"
            if "/opt/pykvshm/router.py" in argv:
                saw.add("router")
                for flag in (w for w in argv if w.startswith("--")):
                    assert flag in router_help.stdout, f"router.py has no {flag}"
            if argv[:2] == ["vllm", "serve"]:
                saw.add("vllm " + json.loads(argv[argv.index("--kv-transfer-config") + 1])["kv_role"])
            sc = c.get("securityContext", {})
            assert not (sc.get("privileged") and sc.get("allowPrivilegeEscalation") is False), \
                f"{name}/{c['name']}: the API server refuses privileged with allowPrivilegeEscalation false"
            for ref in c.get("envFrom", []):
                assert ref["configMapRef"]["name"] == "pykvshm-config"
            for m in c.get("volumeMounts", []):
                mounts[(c["name"], m["name"])] = m
        pool_volume = [v for v in spec.get("volumes", []) if v["name"] == "pool"]
        assert pool_volume, f"{name} does not mount the pool"
        for (cname, vname), m in mounts.items():
            if vname == "pool":
                assert pool == m["mountPath"] or pool.startswith(m["mountPath"].rstrip("/") + "/"), (name, cname)
                if cname == "exporter" or cname.startswith("wait"):
                    assert m.get("readOnly") is True, f"{name}/{cname} only reads the pool: mount it read-only"
    assert {"create", "info", "exporter", "router", "vllm kv_producer", "vllm kv_consumer"} <= saw, saw

    # Every Service selects some pod, on a port that pod names.
    for svc in (d for d in docs if d["kind"] == "Service"):
        sel = svc["spec"]["selector"]
        pods = [spec for _, labels, spec in pod_specs(docs) if sel.items() <= labels.items()]
        assert pods, f"Service {svc['metadata']['name']} selects no pod"
        named = {p["name"] for spec in pods for c in spec["containers"] for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in named, f"Service {svc['metadata']['name']}: no container port {port['targetPort']}"
