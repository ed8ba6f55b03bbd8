"""deploy/kubernetes, offline: every manifest against the Kubernetes schemas
(kubernetes-validate, strict), and the parts that must agree with each other and with
the image. The StatefulSet's command itself runs in tests/test_netns.py."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"
ROOT = DEPLOY.parent.parent


def documents() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        found += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return found


def by_kind(kind: str) -> dict[str, Any]:
    return next(doc for _, doc in documents() if doc["kind"] == kind)


@pytest.mark.parametrize("name, doc", documents(), ids=[n for n, _ in documents()])
def test_manifest_matches_the_kubernetes_schema(name: str, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_a_manifest_that_is_wrong_is_caught() -> None:
    broken = by_kind("StatefulSet")
    broken["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, kubernetes_validate.latest_version(), strict=True)


def test_the_parts_agree() -> None:
    service, stateful = by_kind("Service"), by_kind("StatefulSet")
    spec = stateful["spec"]
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    # rank from the ordinal, head at ordinal 0 behind the headless Service
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert spec["serviceName"] == service["metadata"]["name"] == env["SHARDLINE_SERVICE"]
    assert service["spec"]["selector"].items() <= spec["template"]["metadata"][
        "labels"].items()
    assert int(env["SHARDLINE_WORLD_SIZE"]) == spec["replicas"]
    assert spec["podManagementPolicy"] == "Parallel"
    ports = {p["containerPort"] for p in container["ports"]}
    assert int(env["SHARDLINE_PORT"]) in ports
    assert service["spec"]["ports"][0]["targetPort"] in ports
    # GPUs are requested (one per rank)
    assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] >= 1
    # the keys come from a Secret, mounted where the command's --keys points
    command = container["command"]
    assert command[:2] == ["shardline", "run"]
    keys_dir = command[command.index("--keys") + 1]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "keys")
    assert Path(container["workingDir"], keys_dir) == Path(mount["mountPath"])
    secret = next(v for v in pod["volumes"] if v["name"] == "keys")["secret"]
    assert secret["secretName"]
    # the script the command names is where the image puts it
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    into_app = dockerfile.rpartition(f"WORKDIR {container['workingDir']}\n")[2]
    copied = dict((target, source) for source, target in
                  re.findall(r"^COPY (\S+) \./(\S+)$", into_app, re.M))
    script = command[-1]
    assert script in copied and (ROOT / copied[script]).is_file()
    for source in re.findall(r"^COPY (\S+) ", dockerfile, re.M):
        assert (ROOT / source).exists(), source
