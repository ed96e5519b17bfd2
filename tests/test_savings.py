"""The end-of-run table's uplink breakdown, on rows of real loopback runs (defaults vs plain)."""

from __future__ import annotations

from loopback import PLAIN, LoopbackGrid

from fleetfl.coordinator.config import load_config
from fleetfl.coordinator.report import build_summary
from fleetfl.coordinator.savings import savings_rows, uplink_breakdown
from fleetfl.coordinator.server_app import RunOutcome, run_rounds

SMALL = ["task.dataset=digits", "task.model=logreg", "federation.num_clients=6",
         "federation.clients_per_round=3", "federation.rounds=2", "federation.local_epochs=1",
         "fleet.mix={rpi4=1}"]
LOGREG_VALUES = 64 * 10 + 10  # weight + bias
LOGREG_PRUNABLE = 64 * 10


def _rows(overrides: list[str]) -> tuple[list[dict], dict]:
    cfg = load_config(None, [*overrides, *SMALL])
    outcome = RunOutcome()
    run_rounds(LoopbackGrid(cfg.federation.num_clients), cfg, outcome)
    return outcome.rows, cfg.to_dict()


def test_the_defaults_save_by_pruning_and_int8_and_pay_for_secagg() -> None:
    rows, config = _rows([])  # the defaults: int8, 80 % pruning (rounds 1 -> 2 here), SecAgg+
    assert [r["values_total"] for r in rows] == [LOGREG_VALUES] * 2
    pruned = [LOGREG_VALUES - r["values_kept"] for r in rows]
    assert pruned == [round(r["sparsity"] * LOGREG_PRUNABLE) for r in rows]
    assert pruned[0] == 0 and pruned[-1] == round(0.8 * LOGREG_PRUNABLE)
    up = uplink_breakdown(rows, 8)
    assert up["pruning"] == sum(4 * r["received"] * p for r, p in zip(rows, pruned, strict=True))
    assert up["int8"] == sum(3 * r["received"] * r["values_kept"] for r in rows)
    assert up["secagg"] == sum(r["secagg_uplink_bytes"] for r in rows) > 0
    assert up["sent"] == sum(r["uplink_bytes"] + r["secagg_uplink_bytes"] for r in rows)
    assert up["reference"] - up["pruning"] - up["int8"] + up["encoding"] + up["secagg"] \
        == up["sent"]
    summary = build_summary(rows, config=config, clients_total=6, wall_time_s=1.0)
    labels = [label for label, _ in savings_rows(summary)]
    assert {"pruning (values not sent)", "int8 updates (1 B a value, not 4)",
            "secure aggregation (keys, shares)", "uplink sent",
            "downlink (model, masks)"} <= set(labels)
    assert summary["downlink_fp32_model_bytes"] == sum(
        4 * r["selected"] * LOGREG_VALUES for r in rows) > summary["downlink_bytes_total"]


def test_a_plain_run_credits_nothing_to_pruning_or_int8() -> None:
    rows, config = _rows(PLAIN)
    up = uplink_breakdown(rows, 32)
    assert up["pruning"] == up["int8"] == up["secagg"] == 0
    assert up["encoding"] == up["sent"] - up["reference"]  # zlib and framing only
    assert up["encoding"] < 0  # zlib shrinks these float32 deltas (1.4x measured)
    summary = build_summary(rows, config=config, clients_total=6, wall_time_s=1.0)
    labels = [label for label, _ in savings_rows(summary)]
    assert "pruning (values not sent)" not in labels and "uplink sent" in labels
