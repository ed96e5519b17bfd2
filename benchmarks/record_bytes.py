"""Counting a message's bytes: ``protocol.record_bytes`` against Flower's plain traversal.

The coordinator counts every train message and reply it sends or gets (``metrics.jsonl``'s
uplink/downlink bytes), on the ServerApp's one thread. Flower recomputes an object's id
(deflate + SHA-256) whenever it is asked, and a parent's id asks again for its children's;
``record_bytes`` computes each id once (Flower's ``no_object_id_recompute``). Both count the
same bytes (checked here). A train message as the coordinator builds it: a 30-key config record
and a model blob of ``--sizes`` bytes. Medians of ``--repeats`` calls, alternated.

    python -m benchmarks.record_bytes [--sizes 32000 160000] [--repeats 200]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

from flwr.app import ConfigRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from benchmarks.common import emit
from fleetfl import protocol as P


def flower_count(content: RecordDict) -> int:
    """The count as Flower's traversal gives it, ids recomputed (what we did before)."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(content).values())


def _time(fn: Callable[[], int]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32_000, 160_000])
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    rows = []
    for size in args.sizes:
        content = RecordDict({
            P.CONFIG: ConfigRecord({f"key-{i}": i for i in range(30)}),
            P.PAYLOAD: ConfigRecord({P.MODEL_BLOB: os.urandom(size)}),
        })
        assert P.record_bytes(content) == flower_count(content)
        before, now = [], []
        for _ in range(args.repeats):
            before.append(_time(lambda: flower_count(content)))  # noqa: B023 - called at once
            now.append(_time(lambda: P.record_bytes(content)))  # noqa: B023
        rows.append({"blob_bytes": size, "counted_bytes": P.record_bytes(content),
                     "before_us": statistics.median(before) * 1e6,
                     "now_us": statistics.median(now) * 1e6,
                     "speedup": statistics.median(before) / statistics.median(now)})
    emit("record_bytes", {"repeats": args.repeats, "rows": rows})


if __name__ == "__main__":
    main()
