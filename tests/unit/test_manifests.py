"""The deployment files, checked offline: a small embedded schema for the kinds we ship
(unknown keys are typos and fail), plus the rules the docs promise — least privilege with a
reason for each grant, probes on the controller's own endpoints, arguments the CLI accepts —
and the kind helper scripts parse (``bash -n``; shellcheck when it is installed)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from helpers import ROOT

from noderedirect import cli

DEPLOY = ROOT / "deploy"
DOCS = (ROOT / "docs" / "controller.md").read_text()

# ---------------------------------------------------------------- a schema subset

S, I, B = {"type": "string"}, {"type": "integer"}, {"type": "boolean"}
STRMAP = {"type": "map", "values": S}
INT_OR_STR = {"type": "int-or-string"}


def obj(props: dict, required=()) -> dict:
    return {"type": "object", "properties": props, "required": tuple(required)}


def arr(items: dict) -> dict:
    return {"type": "array", "items": items}


METADATA = obj({"name": S, "namespace": S, "labels": STRMAP, "annotations": STRMAP}, ["name"])
PROBE = obj({"httpGet": obj({"path": S, "port": INT_OR_STR, "scheme": S}, ["port"]),
             "initialDelaySeconds": I, "periodSeconds": I, "failureThreshold": I,
             "timeoutSeconds": I, "successThreshold": I})
ENV = obj({"name": S, "value": S,
           "valueFrom": obj({"fieldRef": obj({"fieldPath": S, "apiVersion": S}, ["fieldPath"])})}, ["name"])
CONTAINER = obj({
    "name": S, "image": S, "imagePullPolicy": {"type": "string", "enum": ("Always", "IfNotPresent", "Never")},
    "command": arr(S), "args": arr(S), "env": arr(ENV),
    "ports": arr(obj({"name": S, "containerPort": I, "protocol": S, "hostPort": I}, ["containerPort"])),
    "readinessProbe": PROBE, "livenessProbe": PROBE,
    "resources": obj({"requests": STRMAP, "limits": STRMAP}),
    "securityContext": obj({"privileged": B, "readOnlyRootFilesystem": B, "allowPrivilegeEscalation": B,
                            "runAsUser": I, "runAsNonRoot": B,
                            "capabilities": obj({"add": arr(S), "drop": arr(S)})}),
    "volumeMounts": arr(obj({"name": S, "mountPath": S, "readOnly": B, "mountPropagation": S},
                            ["name", "mountPath"])),
}, ["name", "image"])
VOLUME = obj({"name": S,
              "hostPath": obj({"path": S, "type": {"type": "string", "enum": (
                  "", "Directory", "DirectoryOrCreate", "File", "FileOrCreate", "Socket")}}, ["path"]),
              "emptyDir": obj({"medium": S, "sizeLimit": S}),
              "configMap": obj({"name": S})}, ["name"])
TOLERATION = obj({"key": S, "operator": {"type": "string", "enum": ("Exists", "Equal")}, "value": S,
                  "effect": S})
POD_SPEC = obj({
    "serviceAccountName": S, "hostNetwork": B, "hostPID": B, "dnsPolicy": S, "priorityClassName": S,
    "terminationGracePeriodSeconds": I, "nodeSelector": STRMAP, "tolerations": arr(TOLERATION),
    "containers": arr(CONTAINER), "initContainers": arr(CONTAINER), "volumes": arr(VOLUME),
}, ["containers"])
DAEMONSET = obj({
    "apiVersion": {"type": "string", "enum": ("apps/v1",)}, "kind": {"type": "string", "enum": ("DaemonSet",)},
    "metadata": METADATA,
    "spec": obj({"selector": obj({"matchLabels": STRMAP}, ["matchLabels"]),
                 "updateStrategy": obj({"type": S, "rollingUpdate": obj({"maxUnavailable": INT_OR_STR,
                                                                          "maxSurge": INT_OR_STR})}),
                 "template": obj({"metadata": obj({"labels": STRMAP, "annotations": STRMAP}),
                                  "spec": POD_SPEC}, ["metadata", "spec"])}, ["selector", "template"]),
}, ["apiVersion", "kind", "metadata", "spec"])
SERVICE_ACCOUNT = obj({"apiVersion": {"type": "string", "enum": ("v1",)},
                       "kind": {"type": "string", "enum": ("ServiceAccount",)}, "metadata": METADATA},
                      ["apiVersion", "kind", "metadata"])
RULE = obj({"apiGroups": arr(S), "resources": arr(S), "verbs": arr(S), "resourceNames": arr(S)},
           ["apiGroups", "resources", "verbs"])
CLUSTER_ROLE = obj({"apiVersion": {"type": "string", "enum": ("rbac.authorization.k8s.io/v1",)},
                    "kind": {"type": "string", "enum": ("ClusterRole",)}, "metadata": METADATA,
                    "rules": arr(RULE)}, ["apiVersion", "kind", "metadata", "rules"])
CLUSTER_ROLE_BINDING = obj({
    "apiVersion": {"type": "string", "enum": ("rbac.authorization.k8s.io/v1",)},
    "kind": {"type": "string", "enum": ("ClusterRoleBinding",)}, "metadata": METADATA,
    "roleRef": obj({"apiGroup": S, "kind": S, "name": S}, ["apiGroup", "kind", "name"]),
    "subjects": arr(obj({"kind": S, "name": S, "namespace": S, "apiGroup": S}, ["kind", "name"])),
}, ["apiVersion", "kind", "metadata", "roleRef", "subjects"])
KIND_CLUSTER = obj({
    "kind": {"type": "string", "enum": ("Cluster",)},
    "apiVersion": {"type": "string", "enum": ("kind.x-k8s.io/v1alpha4",)}, "name": S,
    "networking": obj({"podSubnet": S, "serviceSubnet": S, "kubeProxyMode": S, "disableDefaultCNI": B}),
    "nodes": arr(obj({"role": {"type": "string", "enum": ("control-plane", "worker")}, "image": S}, ["role"])),
}, ["kind", "apiVersion", "nodes"])
SCHEMAS = {"DaemonSet": DAEMONSET, "ServiceAccount": SERVICE_ACCOUNT, "ClusterRole": CLUSTER_ROLE,
           "ClusterRoleBinding": CLUSTER_ROLE_BINDING, "Cluster": KIND_CLUSTER}


def validate(doc, schema: dict, path: str = "") -> list[str]:
    """Problems with ``doc`` against ``schema``, each naming its path."""
    t = schema["type"]
    where = path or "<doc>"
    if t == "string":
        if not isinstance(doc, str):
            return [f"{where}: expected a string, got {doc!r}"]
        if "enum" in schema and doc not in schema["enum"]:
            return [f"{where}: {doc!r} is not one of {schema['enum']}"]
        return []
    if t == "integer":
        return [] if isinstance(doc, int) and not isinstance(doc, bool) else [f"{where}: expected an integer, got {doc!r}"]
    if t == "boolean":
        return [] if isinstance(doc, bool) else [f"{where}: expected true/false, got {doc!r}"]
    if t == "int-or-string":
        return [] if isinstance(doc, (int, str)) and not isinstance(doc, bool) else [f"{where}: expected a port/number, got {doc!r}"]
    if t == "map":
        if not isinstance(doc, dict):
            return [f"{where}: expected a mapping"]
        return [p for k, v in doc.items() for p in validate(v, schema["values"], f"{path}.{k}")]
    if t == "array":
        if not isinstance(doc, list):
            return [f"{where}: expected a list"]
        return [p for i, v in enumerate(doc) for p in validate(v, schema["items"], f"{path}[{i}]")]
    if t == "object":
        if not isinstance(doc, dict):
            return [f"{where}: expected a mapping"]
        out = [f"{where}: missing required key {k!r}" for k in schema["required"] if k not in doc]
        for k, v in doc.items():
            sub = schema["properties"].get(k)
            if sub is None:
                out.append(f"{where}: unknown key {k!r} (a typo, or a field this schema subset does not allow)")
            else:
                out += validate(v, sub, f"{path}.{k}" if path else k)
        return out
    raise AssertionError(f"bad schema type {t}")


def docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d is not None]


def by_kind(name: str) -> dict[str, dict]:
    return {d["kind"]: d for d in docs(name)}


# ---------------------------------------------------------------- the validator itself can fail


def test_the_schema_check_catches_typos_and_wrong_types():
    ds = docs("daemonset.yaml")[0]
    ds["spec"]["template"]["spec"]["hostNetwok"] = True
    ds["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "15111"
    del ds["spec"]["selector"]
    assert validate(ds, DAEMONSET) == [
        "spec: missing required key 'selector'",
        "spec.template.spec.containers[0].ports[0].containerPort: expected an integer, got '15111'",
        "spec.template.spec: unknown key 'hostNetwok' (a typo, or a field this schema subset does not allow)",
    ]


@pytest.mark.parametrize("name", ["daemonset.yaml", "rbac.yaml"])
def test_manifests_match_the_schema(name):
    found = docs(name)
    assert found
    for d in found:
        assert d.get("kind") in SCHEMAS, d.get("kind")
        assert validate(d, SCHEMAS[d["kind"]]) == []


def test_kind_config_matches_the_schema():
    cfg = yaml.safe_load((ROOT / "kind-config" / "kind-3nodes.yaml").read_text())
    assert validate(cfg, KIND_CLUSTER) == []
    assert [n["role"] for n in cfg["nodes"]] == ["control-plane", "worker", "worker"]
    assert cfg["networking"]["podSubnet"] == "10.244.0.0/16"


# ---------------------------------------------------------------- what the docs promise


def pod_spec() -> dict:
    return docs("daemonset.yaml")[0]["spec"]["template"]["spec"]


def container() -> dict:
    (c,) = pod_spec()["containers"]
    return c


JUSTIFIED_CAPABILITIES = {"NET_ADMIN", "NET_RAW", "SYS_ADMIN", "SYS_PTRACE"}
JUSTIFIED_HOST_PATHS = {"/proc": ("Directory", True), "/run/noderedirect": ("DirectoryOrCreate", False),
                        "/run/xtables.lock": ("FileOrCreate", False)}


def test_daemonset_shape():
    ds = docs("daemonset.yaml")[0]
    tmpl = ds["spec"]["template"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= tmpl["metadata"]["labels"].items()
    spec = tmpl["spec"]
    assert spec["hostNetwork"] is True and spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert "hostPID" not in spec                              # /host/proc is read-only instead
    assert tmpl["metadata"]["annotations"]["ambient.istio.io/redirection"] == "disabled"
    env = {e["name"]: e for e in container()["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"


def test_privileges_are_the_justified_ones():
    tmpl = docs("daemonset.yaml")[0]["spec"]["template"]
    sc = container()["securityContext"]
    if sc.get("privileged"):
        why = tmpl["metadata"].get("annotations", {}).get("noderedirect.io/privileged-justification", "")
        assert "/proc/sys" in why and "read-only" in why, "privileged: true needs its reason on the pod"
        assert "privileged: true" in DOCS
    caps = set(sc["capabilities"]["add"])
    assert caps <= JUSTIFIED_CAPABILITIES, caps - JUSTIFIED_CAPABILITIES
    for cap in caps:
        assert f"`{cap}`" in DOCS, f"{cap} is not justified in docs/controller.md"
    assert sc.get("readOnlyRootFilesystem") is True


def test_host_mounts_are_the_justified_ones():
    spec = pod_spec()
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["name"]: m for m in container()["volumeMounts"]}
    assert set(mounts) == set(volumes), "every volume is mounted and every mount has a volume"
    host = {v["hostPath"]["path"]: (v["hostPath"].get("type", ""), mounts[n].get("readOnly", False))
            for n, v in volumes.items() if "hostPath" in v}
    assert host == JUSTIFIED_HOST_PATHS
    for path in host:
        assert f"`{path}`" in DOCS, f"hostPath {path} is not justified in docs/controller.md"
    assert mounts["host-proc"]["mountPath"] == "/host/proc"


def test_args_are_accepted_by_the_cli_and_probes_hit_the_metrics_port():
    c = container()
    args = cli.build_parser().parse_args(c["args"])
    assert args.command == "run"
    assert args.proc_root == "/host/proc"
    port = args.metrics_port
    assert [p["containerPort"] for p in c["ports"]] == [port]
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port}
    state = {e["name"]: e.get("value") for e in c["env"]}["NODEREDIRECT_STATE_DIR"]
    assert any(m["mountPath"] == state for m in c["volumeMounts"])


def test_rbac_is_minimal_and_bound_to_the_daemonsets_account():
    k = by_kind("rbac.yaml")
    sa, role, binding = k["ServiceAccount"], k["ClusterRole"], k["ClusterRoleBinding"]
    ds = docs("daemonset.yaml")[0]
    assert pod_spec()["serviceAccountName"] == sa["metadata"]["name"]
    assert sa["metadata"]["namespace"] == ds["metadata"]["namespace"]
    grants = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
              for v in rule["verbs"]}
    assert grants == {("", "pods", v) for v in ("get", "list", "watch", "patch")} | {
        ("", r, v) for r in ("namespaces", "nodes") for v in ("get", "list", "watch")}
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": sa["metadata"]["namespace"]}]


def test_dockerfile_installs_the_tools_the_host_layer_runs():
    text = (DEPLOY / "Dockerfile").read_text()
    base = next(l.split()[1] for l in text.splitlines() if l.startswith("FROM "))
    assert "slim" in base
    install = next(l for l in text.splitlines() if "apt-get install" in l)
    for pkg in ("iptables", "ipset", "nftables", "libnftables1", "iproute2"):
        assert f" {pkg}" in install, pkg
    assert 'ENTRYPOINT ["noderedirect"]' in text
    image = container()["image"]
    assert image in (ROOT / "scripts" / "kind-load.sh").read_text()


# ---------------------------------------------------------------- scripts and docs


SCRIPTS = [ROOT / "scripts" / "kind-up.sh", ROOT / "scripts" / "kind-load.sh"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_kind_scripts_parse(script):
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_kind_scripts_are_shellcheck_clean(script):
    r = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def test_docs_say_the_kind_recipes_are_not_run_by_ci():
    assert "not exercised by CI" in DOCS
    for name in ("scripts/kind-up.sh", "scripts/kind-load.sh", "kind-config/kind-3nodes.yaml",
                 "deploy/daemonset.yaml", "deploy/rbac.yaml"):
        assert name in DOCS, name
