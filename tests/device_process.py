"""A Grid whose clients are real devices, each train message run in a fresh process.

This is how a deployed SuperNode runs fleetfl's ClientApp (a new process per message), minus
Flower's transport: the real ClientApp, in device mode (``node_config["data-path"]`` and
``["device"]``), gets the coordinator's train message in a fresh ``python`` process, and the
process's peak resident memory (VmHWM) is read when it is done. Registration queries are
answered in this process, without the runtime memory a device would report (this process's
is not a device's). A fresh process keeps no
``context.state`` between rounds (masks, error feedback), so runs should be one round, or keep
pruning and int8 error feedback off. Used by tests/test_memory_round.py and
benchmarks/memory_planner.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.supercore.task_identity import TaskIdentity

from fleetfl import protocol as P
from fleetfl.client.app import app as client_app

# One train message in a fresh process: message.json + model.bin in, reply.json (+ update.bin)
# out. The reply carries the process's VmHWM, read after the ClientApp returned.
CHILD = r"""
import json, sys
from pathlib import Path
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from fleetfl import protocol as P
from fleetfl.client.app import app

work = Path(sys.argv[1])
spec = json.loads((work / "message.json").read_text())
TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, spec["node"], 1
content = RecordDict({
    P.CONFIG: ConfigRecord(spec["config"]),
    P.PAYLOAD: ConfigRecord({P.MODEL_BLOB: (work / "model.bin").read_bytes()}),
})
msg = Message(content, dst_node_id=spec["node"], message_type="train")
msg.metadata.__dict__["_message_id"] = "m"
context = Context(run_id=1, node_id=spec["node"], node_config=spec["node_config"],
                  state=RecordDict(), run_config={})
reply = app(msg, context)
out = {}
if reply.has_error():
    out["error"] = {"code": reply.error.code, "reason": reply.error.reason}
else:
    out["metrics"] = dict(reply.content[P.METRICS])
    (work / "update.bin").write_bytes(reply.content[P.PAYLOAD][P.UPDATE_BLOB])
status = Path("/proc/self/status").read_text().splitlines()
out["peak_rss"] = next(int(l.split()[1]) * 1024 for l in status if l.startswith("VmHWM:"))
(work / "reply.json").write_text(json.dumps(out))
"""

# What a train process holds when it checks its plan: the ClientApp's imports, the device's
# data and model (mmap threshold pinned, as the ClientApp does on a device). Prints VmRSS.
RUNTIME = r"""
import json, sys
from fleetfl.client import memory
from fleetfl.client.app import app
from fleetfl.client.local import load_local_task, task_settings
from fleetfl.devices.memory_stats import rss_bytes

memory.prepare_device_process()
cfg, node_config = json.loads(sys.argv[1]), json.loads(sys.argv[2])
local = load_local_task(task_settings(cfg), node_config)
model = local.fresh_model()
print(rss_bytes())
"""


def child_env() -> dict[str, str]:
    """The environment of a device process: one intra-op thread (this machine is shared;
    idle worker threads spinning on other jobs' cores only add noise)."""
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def runtime_bytes(cfg: Mapping[str, Any], node_config: Mapping[str, Any]) -> int:
    """Resident bytes of a fresh device process once it has loaded what a train message needs
    (``cfg``: a message config with the ``task.*`` keys)."""
    proc = subprocess.run([sys.executable, "-c", RUNTIME, json.dumps(dict(cfg)),
                           json.dumps(dict(node_config))], capture_output=True, text=True,
                          check=True, env=child_env())
    return int(proc.stdout.strip().splitlines()[-1])


def _without_runtime(reply: Message) -> Message:
    """A registration answered in this (test) process reports this process's memory, not a
    device process's: drop it, so the coordinator assumes ``fleet.runtime_memory_mib`` as for
    a device that reports none."""
    if not reply.has_error() and P.CONFIG in reply.content.config_records:
        cfg = reply.content[P.CONFIG]
        if P.RUNTIME_BYTES in cfg:
            del cfg[P.RUNTIME_BYTES]
    return reply


class ProcessGrid:
    """Nodes ``1000 + i`` are real devices with ``node_configs[i]``; ``peaks[node]`` is the
    VmHWM (bytes) of the process that ran the node's last train message."""

    def __init__(self, node_configs: list[dict[str, Any]]) -> None:
        self.nodes = {1000 + i: dict(nc) for i, nc in enumerate(node_configs)}
        self.sent: list[Message] = []
        self.peaks: dict[int, int] = {}
        self.errors: dict[int, str] = {}
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> list[Message]:
        replies = []
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{len(self.sent)}-{i}"
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            if msg.metadata.message_type == "train":
                replies.append(self._train_in_process(msg, node))
            else:
                context = Context(run_id=1, node_id=node, node_config=self.nodes[node],
                                  state=RecordDict(), run_config={})
                replies.append(_without_runtime(client_app(msg, context)))
        return replies

    def _train_in_process(self, msg: Message, node: int) -> Message:
        with tempfile.TemporaryDirectory(prefix="fleetfl-device-") as tmp:
            work = Path(tmp)
            spec = {"node": node, "node_config": self.nodes[node],
                    "config": dict(msg.content[P.CONFIG])}
            (work / "message.json").write_text(json.dumps(spec))
            (work / "model.bin").write_bytes(msg.content[P.PAYLOAD][P.MODEL_BLOB])
            proc = subprocess.run([sys.executable, "-c", CHILD, str(work)], capture_output=True,
                                  text=True, env=child_env())
            if proc.returncode != 0:
                self.errors[node] = proc.stderr[-2000:]
                error = Error(code=ErrorCode.CLIENT_APP_CRASHED,
                              reason=f"device process crashed: {proc.stderr[-500:]}")
                return Message(error, reply_to=msg)
            out = json.loads((work / "reply.json").read_text())
            self.peaks[node] = out["peak_rss"]
            if "error" in out:
                self.errors[node] = out["error"]["reason"]
                return Message(Error(code=out["error"]["code"], reason=out["error"]["reason"]),
                               reply_to=msg)
            content = RecordDict({
                P.PAYLOAD: ConfigRecord({P.UPDATE_BLOB: (work / "update.bin").read_bytes()}),
                P.METRICS: MetricRecord(out["metrics"]),
            })
            return Message(content, reply_to=msg)
