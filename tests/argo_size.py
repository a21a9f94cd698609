"""An estimate of how large Argo's Workflow object grows for a compiled KFP pipeline run: no cluster here.

Argo keeps a run's node statuses in the Workflow object, gzipped and base64-encoded past 1 MiB, and ends a run
whose object is still over 1 MiB (`MAX_WORKFLOW_SIZE`). KFP's Argo compiler (backend/src/v2/compiler/argocompiler)
turns each container task into a driver pod (inputs: the component spec, the task spec, the container spec and
the Kubernetes config; output: the pod-spec patch, which holds the component spec, the executor input and the
user command with its code), an executor DAG node and a pod (both with the patch as input); each DAG task into a
driver pod and a DAG node; each ParallelFor into an iterator DAG, an iteration driver, a task group and, per
item, an iteration DAG, a driver and a DAG node. KFP 2.17's manifests give every template a retry strategy,
which wraps each node in a Retry node. This builds those node statuses from a compiled spec, with every node
succeeded, and measures them as Argo stores them. A model, not a measurement: compare it with
`kubectl get workflow RUN -o json | wc -c` on a cluster.
"""

from __future__ import annotations

import base64
import gzip
import json
import random
from pathlib import Path

import yaml

MAX_WORKFLOW_SIZE = 1024 * 1024


def _json(o) -> str:
    return json.dumps(o, separators=(",", ":"), sort_keys=True)


class Run:
    """The node statuses of one run of a compiled pipeline: `shards` items in the loop over the plan's output,
    `per_shard` in every other loop, every condition true."""

    def __init__(self, spec_file: Path, shards: int, per_shard: int, retry_nodes: bool = True):
        spec, platform = yaml.safe_load_all(spec_file.read_text())
        self.spec, self.shards, self.per_shard, self.retry_nodes = spec, shards, per_shard, retry_nodes
        self.k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
        self.nodes: dict[str, dict] = {}
        self._random = random.Random(0)  # Argo names a node by a hash of its name: the map's order is scattered
        self._dag("root", spec["root"]["dag"], "run")

    def _id(self) -> str:
        return f"run-{self._random.randrange(10**9, 10**10)}"

    def _node(self, name: str, kind: str, inputs: dict | None = None, outputs: dict | None = None) -> None:
        node = {"name": name, "displayName": name.rsplit(".", 1)[-1], "type": kind, "phase": "Succeeded",
                "templateScope": "local/run", "boundaryID": self._id(), "progress": "1/1",
                "startedAt": "2026-11-28T02:00:00Z", "finishedAt": "2026-11-28T02:01:00Z",
                "resourcesDuration": {"cpu": 12, "memory": 40}, "children": [self._id()]}  # fmt: skip
        if inputs:
            node["inputs"] = {"parameters": [{"name": k, "value": v} for k, v in inputs.items()]}
        if outputs:
            node["outputs"] = {"parameters": [{"name": k, "value": v} for k, v in outputs.items()], "exitCode": "0"}
        if self.retry_nodes:
            self.nodes[self._id()] = {**node, "type": "Retry", "nodeFlag": {"retried": True}}
            node = {**node, "name": f"{name}(0)"}
        self.nodes[self._id()] = node

    def _container(self, path: str, task: dict, component: dict, item: int | None) -> None:
        executor = self.spec["deploymentSpec"]["executors"][component["executorLabel"]]["container"]
        k8s = self.k8s.get(component["executorLabel"], {})
        # its parameters' values and its outputs' URIs, which name the task's own execution
        executor_input = {"inputs": component.get("inputDefinitions", {}),
                          "outputs": component.get("outputDefinitions", {}),
                          "uri": f"s3://oneword-artifacts/pipeline-root/run/{path}/{self._id()}"}  # fmt: skip
        patch = _json({"containers": [{"name": "main", "image": executor["image"], "command": [
            "/kfp-launcher/launch", "--executor_input", _json(executor_input), "--component_spec", _json(component),
            "--", *executor.get("command", []), *executor.get("args", [])]}]})  # fmt: skip
        inputs = {"component": _json(component), "task": _json(task), "container": _json(executor),
                  "kubernetes-config": _json(k8s), "parent-dag-id": "1234",
                  "iteration-index": str(-1 if item is None else item)}  # fmt: skip
        self._node(f"{path}-driver", "Pod", inputs, {"pod-spec-patch": patch, "cached-decision": "false"})
        self._node(path, "DAG", {"pod-spec-patch": patch, "cached-decision": "false"})
        self._node(f"{path}.executor", "Pod", {"pod-spec-patch": patch})

    def _dag(self, name: str, dag: dict, path: str, item: int | None = None) -> None:
        for task_name, task in dag["tasks"].items():
            component = self.spec["components"][task["componentRef"]["name"]]
            at = f"{path}.{task_name}"
            if "executorLabel" in component:
                self._container(at, task, component, item)
                continue
            driver = {"component": _json(component), "task": _json(task), "parent-dag-id": "1234"}
            if "parameterIterator" not in task:
                self._node(f"{at}-driver", "Pod", driver, {"execution-id": "4567", "condition": "true"})
                self._node(at, "DAG", {"parent-dag-id": "4567"})
                self._dag(task_name, component["dag"], at, item)
                continue
            source = task["parameterIterator"]["items"].get("inputParameter", "")
            count = self.shards if "plan-batch" in source else self.per_shard
            self._node(at, "DAG", {"parent-dag-id": "1234"})
            self._node(f"{at}.iteration-driver", "Pod", driver, {"execution-id": "4567", "iteration-count": str(count)})
            self._node(f"{at}.iteration-iterations", "TaskGroup")
            for i in range(count):
                each = f"{at}.iteration-iterations({i}:{i})"
                self._node(each, "DAG", {"parent-dag-id": "4567", "iteration-index": str(i)})
                self._node(f"{each}.iteration-item-driver", "Pod", {**driver, "iteration-index": str(i)},
                           {"execution-id": "7890"})  # fmt: skip
                self._node(f"{each}.iteration-item", "DAG", {"parent-dag-id": "7890"})
                self._dag(task_name, component["dag"], f"{each}.iteration-item", i)

    def spec_bytes(self) -> int:
        """The Workflow's spec, roughly, which Argo does not compress: the pipeline spec; per DAG task, a task of
        Argo's passing its component spec, task spec and container spec to the driver as arguments; and KFP's
        fixed templates (drivers, executors, their retrying twins: about 4 KiB each)."""
        size = len(_json(self.spec)) + len(_json(self.k8s)) + 9 * 4000
        dags = [self.spec["root"]["dag"], *(c["dag"] for c in self.spec["components"].values() if "dag" in c)]
        for task in (t for dag in dags for t in dag["tasks"].values()):
            component = self.spec["components"][task["componentRef"]["name"]]
            executor = self.spec["deploymentSpec"]["executors"].get(component.get("executorLabel", ""), {})
            size += len(_json(component)) + len(_json(task)) + len(_json(executor)) + 800
        return size

    def status_bytes(self) -> int:
        """The node statuses as Argo stores them past 1 MiB: gzipped, then base64-encoded."""
        return len(base64.b64encode(gzip.compress(_json(self.nodes).encode())))

    def total(self) -> int:
        return self.spec_bytes() + self.status_bytes()
