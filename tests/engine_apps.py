"""ClientApps for the local engine's tests, importable by its spawned worker processes."""

import os
import time

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Replies with its partition, its process and how many messages this node has had;
    ``act`` in the message's config makes it raise, die, or sleep first."""
    cfg = msg.content["config"]
    act, partition = str(cfg.get("act", "")), int(context.node_config["partition-id"])
    if partition in list(cfg.get("targets", [])):
        if act == "raise":
            raise ValueError(f"partition {partition} refuses")
        if act == "die":
            os._exit(3)  # the worker process dies, as under the OOM killer
        if act == "sleep":
            time.sleep(float(cfg["seconds"]))
    seen = int(context.state.config_records.get("seen", ConfigRecord({"n": 0}))["n"]) + 1
    context.state["seen"] = ConfigRecord({"n": seen})
    return Message(RecordDict({"config": ConfigRecord(
        {"partition": partition, "pid": os.getpid(), "seen": seen})}), reply_to=msg)


not_an_app = 42
