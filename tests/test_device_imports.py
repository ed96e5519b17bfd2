"""A device with only ``fleetfl[device]`` installed can register and train.

The ClientApp runs in a child process where importing scikit-learn, SciPy, ONNX, ONNX Runtime,
matplotlib or Ray fails, as on a Raspberry Pi with the device extra only. It answers a
``register`` query (reporting its measured runtime memory) and a ``train`` message (built as
the coordinator builds them) from a real device's ``.npz`` shard.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from fleetfl.tasks.data_format import save_npz

CHILD = r"""
import sys

NOT_ON_A_DEVICE = ("sklearn", "scipy", "onnx", "onnxruntime", "matplotlib", "ray")


class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in NOT_ON_A_DEVICE:
            raise ImportError(f"{name} is not part of fleetfl[device]")
        return None


sys.meta_path.insert(0, Block())

import json

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fleetfl import protocol as P
from fleetfl.client.app import app

TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
shared = json.loads(sys.argv[2])  # what the coordinator sends every client
context = Context(run_id=1, node_id=7, node_config={"data-path": sys.argv[1], "device": "rpi4"},
                  state=RecordDict(), run_config={})


def send(content, kind, n):
    msg = Message(content, dst_node_id=7, message_type=kind)
    msg.metadata.__dict__["_message_id"] = f"m{n}"
    reply = app(msg, context)
    assert not reply.has_error(), reply.error.reason
    return reply.content


register = send(RecordDict({P.CONFIG: ConfigRecord({**shared, P.OP: P.OP_REGISTER})}), "query", 0)
from fleetfl.compression.codec import encode_model
from fleetfl.tasks.models import build_model

weights = {k: v.numpy() for k, v in build_model("cnn", (1, 8, 8), 10).state_dict().items()}
plan = {"plan.epochs": 1.0, "plan.max-samples": 0, "plan.batch-size": 10,
        "plan.straggler": False}
config = ConfigRecord({**shared, **plan, P.SERVER_ROUND: 1, P.PROXIMAL_MU: 0.01, P.CLIP: 0.05})
payload = ConfigRecord({P.MODEL_BLOB: encode_model(weights, round=1, scales={})})
train = send(RecordDict({P.CONFIG: config, P.PAYLOAD: payload}), "train", 1)
assert 50 * 2**20 < register[P.CONFIG][P.RUNTIME_BYTES] < 2**31  # VmRSS with torch loaded
print(register[P.CONFIG][P.NUM_EXAMPLES], train[P.METRICS][P.STEPS],
      len(train[P.PAYLOAD][P.UPDATE_BLOB]) > 0)
"""


def test_register_and_train_without_coordinator_packages(tmp_path: Path) -> None:
    from fleetfl.coordinator.config import load_config
    from fleetfl.coordinator.server_app import message_config

    rng = np.random.default_rng(0)
    shard = save_npz(tmp_path / "shard.npz", rng.random((25, 1, 8, 8)), rng.integers(0, 10, 25))
    shared = json.dumps(dict(message_config(load_config(None, ["task.model='cnn'"]))))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(shard), shared], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["25", "3", "True"]  # ceil(25 / 10) steps
