"""Uplink/downlink bytes vs accuracy for compressed updates (issue 3's table), over several seeds.

Digits CNN, 20 clients with Dirichlet(0.5) label skew, 10 per round, 60 rounds. Every variant
runs with the same seeds; seed ``s`` sets ``task.seed`` (data split, held-out set, model init,
mini-batch order) and ``fleet.seed`` (device assignment, availability, cohort sampling), so the
variants of one seed see the same data and fleet and "points lost" is paired by seed.

Variants: dense fp32 (plain float32 updates and model, no entropy coding), int8 updates + int8
model, and 50/60/65/70/75/90 % pruned + int8 (cubic schedule from round 2 to round 20); the int8
variants zlib their blobs (lossless, ``compression.entropy_coding``). A few extra variants
(names starting with ``x:``) change one more setting, named in the variant; they are not run
unless asked for with ``--variants``. Bytes come from the serialized Flower messages; "dense
fp32 reply" is the plain-Flower reply (fp32 ArrayRecord of the model + metrics) for the same
client-rounds.

Per variant the JSON gives mean ± std over seeds (sample std) of final accuracy and of the mean
accuracy of the last 5 rounds, points lost vs dense fp32 (paired by seed, so the std is that of
the per-seed differences), uplink bytes per client-round (mean over rounds, and the final
round's), downlink bytes per client-round, and the uplink reduction vs dense fp32. The JSON is
rewritten after every run, so an interrupted run keeps what finished; ``--reuse`` picks up runs
already finished in ``--out`` (same settings) instead of running them again.

    python -m benchmarks.compression [--rounds 60] [--seeds 3] [--variants dense,int8,p75] \
        [--reuse]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tomllib
from pathlib import Path
from typing import Any

from benchmarks.common import PLAIN, RESULTS, emit, machine, simulate

BASE = [*PLAIN, "compression.prune_start_round=2", "compression.prune_end_round=20",
        "output.plot=false"]
INT8 = ["compression.update_bits=8", "compression.downlink_bits=8"]


def _pruned(sparsity: float, *extra: str) -> list[str]:
    """int8 + pruning overrides; an ``extra`` item replaces the one with the same key."""
    items = [*INT8, f"compression.prune_final_sparsity={sparsity}"]
    for item in extra:
        key = item.split("=", 1)[0]
        items = [i for i in items if i.split("=", 1)[0] != key] + [item]
    return items


# key -> (label, overrides on top of BASE). Keys are what --variants takes.
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "dense": ("dense fp32", ["compression.update_bits=32", "compression.downlink_bits=32",
                             "compression.entropy_coding=false"]),
    "int8": ("int8", list(INT8)),
    "p50": ("50% pruned + int8", _pruned(0.5)),
    "p60": ("60% pruned + int8", _pruned(0.6)),
    "p65": ("65% pruned + int8", _pruned(0.65)),
    "p70": ("70% pruned + int8", _pruned(0.7)),
    "p75": ("75% pruned + int8", _pruned(0.75)),
    "p90": ("90% pruned + int8", _pruned(0.9)),
    # Extras: one setting differs from the common ones, and the label says which.
    "x:p75-end40": ("75% pruned + int8, prune_end_round=40",
                    _pruned(0.75, "compression.prune_end_round=40")),
    "x:p75-end10": ("75% pruned + int8, prune_end_round=10",
                    _pruned(0.75, "compression.prune_end_round=10")),
    "x:p75-clip1e-2": ("75% pruned + int8, clip_target=0.01",
                       _pruned(0.75, "compression.clip_target=0.01")),
    "x:p75-qat": ("75% pruned + int8, qat=true", _pruned(0.75, "compression.qat=true")),
    "x:p75-down16": ("75% pruned + int8 uplink, float16 downlink",
                     _pruned(0.75, "compression.downlink_bits=16")),
    "x:p75-down32": ("75% pruned + int8 uplink, float32 downlink",
                     _pruned(0.75, "compression.downlink_bits=32")),
    "x:p75-fp32": ("75% pruned, fp32 updates and model (no int8)",
                   ["compression.update_bits=32", "compression.downlink_bits=32",
                    "compression.prune_final_sparsity=0.75"]),
    "x:p90-end40": ("90% pruned + int8, prune_end_round=40",
                    _pruned(0.9, "compression.prune_end_round=40")),
    # Prune only once the model has learned something (round 10: ~75-85 % accuracy), not from
    # round 2, where the magnitudes are still those of the random initialization.
    "x:p75-start10": ("75% pruned + int8, pruning from round 10 to 30",
                      _pruned(0.75, "compression.prune_start_round=10",
                              "compression.prune_end_round=30")),
    "x:p75-start10-end20": ("75% pruned + int8, pruning from round 10 to 20",
                            _pruned(0.75, "compression.prune_start_round=10",
                                    "compression.prune_end_round=20")),
    "x:p75-start5-end15": ("75% pruned + int8, pruning from round 5 to 15",
                           _pruned(0.75, "compression.prune_start_round=5",
                                   "compression.prune_end_round=15")),
    "x:p75-start5-end20": ("75% pruned + int8, pruning from round 5 to 20",
                           _pruned(0.75, "compression.prune_start_round=5",
                                   "compression.prune_end_round=20")),
    "x:p75-start10-end25": ("75% pruned + int8, pruning from round 10 to 25",
                            _pruned(0.75, "compression.prune_start_round=10",
                                    "compression.prune_end_round=25")),
    "x:p80-start10": ("80% pruned + int8, pruning from round 10 to 30",
                      _pruned(0.8, "compression.prune_start_round=10",
                              "compression.prune_end_round=30")),
    "x:p90-start10": ("90% pruned + int8, pruning from round 10 to 30",
                      _pruned(0.9, "compression.prune_start_round=10",
                              "compression.prune_end_round=30")),
    "x:p80-start10-end40": ("80% pruned + int8, pruning from round 10 to 40",
                            _pruned(0.8, "compression.prune_start_round=10",
                                    "compression.prune_end_round=40")),
    "x:p85-start10": ("85% pruned + int8, pruning from round 10 to 30",
                      _pruned(0.85, "compression.prune_start_round=10",
                              "compression.prune_end_round=30")),
    "x:p85-start15-end40": ("85% pruned + int8, pruning from round 15 to 40",
                            _pruned(0.85, "compression.prune_start_round=15",
                                    "compression.prune_end_round=40")),
    "x:p80-start15-end40": ("80% pruned + int8, pruning from round 15 to 40",
                            _pruned(0.8, "compression.prune_start_round=15",
                                    "compression.prune_end_round=40")),
}
DEFAULT_VARIANTS = ["dense", "int8", "p50", "p60", "p65", "p70", "p75", "p90"]
BASELINE = "dense"


def _dirname(key: str) -> str:
    return key.replace(":", "_")


def _expected(overrides: list[str]) -> dict[tuple[str, str], Any]:
    """``{(section, key): value}`` of ``section.key=value`` overrides (values read as TOML)."""
    out = {}
    for item in overrides:
        dotted, value = item.split("=", 1)
        section, key = dotted.split(".", 1)
        out[(section, key)] = tomllib.loads(f"v = {value}")["v"]
    return out


def _reusable(out: Path, overrides: list[str]) -> bool:
    """A finished run in ``out`` whose resolved config has every override's value."""
    try:
        summary = json.loads((out / "summary.json").read_text())
        rows = (out / "metrics.jsonl").read_text().splitlines()
    except (OSError, ValueError):
        return False
    config = summary.get("config", {})
    if len(rows) != summary.get("rounds"):
        return False
    for (section, key), value in _expected(overrides).items():
        if section == "output":
            continue
        if config.get(section, {}).get(key) != value:
            return False
    return True


def _layer_sparsity(out: Path) -> dict[str, float] | None:
    """Fraction pruned per masked tensor of the final checkpoint (``model.pt``), if any."""
    try:
        import torch

        ckpt = torch.load(out / "model.pt", weights_only=True)
    except Exception:  # noqa: BLE001 - optional detail; the benchmark's figures do not need it
        return None
    masks = ckpt.get("masks") or {}
    return {name: round(1.0 - float(torch.as_tensor(m).float().mean()), 4)
            for name, m in masks.items()}


def run_one(key: str, seed: int, rounds: int, root: Path, reuse: bool) -> dict[str, Any]:
    label, overrides = VARIANTS[key]
    settings = [f"federation.rounds={rounds}", *BASE, *overrides,
                f"task.seed={seed}", f"fleet.seed={seed}"]
    out = root / f"seed{seed}" / _dirname(key)
    reused = reuse and _reusable(out, settings)
    if reused:
        summary = json.loads((out / "summary.json").read_text())
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    else:
        summary, rows = simulate(settings, out)
    last = rows[-1]
    problems = {k: summary.get(k, 0) for k in ("failed_total", "rejected_total")
                if summary.get(k, 0)}
    return {
        "variant": key, "label": label, "seed": seed, "overrides": overrides, "reused": reused,
        "final_accuracy": summary["final_accuracy"],
        "mean_accuracy_last5": statistics.fmean(r["accuracy"] for r in rows[-5:]),
        "best_accuracy": max(r["accuracy"] for r in rows),
        "uplink_bytes_per_client_round": summary["uplink_bytes_per_client_round"],
        "uplink_bytes_per_client_round_final": last["uplink_bytes"] / last["received"]
        if last["received"] else math.nan,
        "downlink_bytes_per_client_round": summary["downlink_bytes_per_client_round"],
        "downlink_bytes_per_client_round_final": last["downlink_bytes"] / last["selected"]
        if last["selected"] else math.nan,
        "compression_ratio_uplink": summary["compression_ratio_uplink"],
        "final_sparsity": summary["final_sparsity"],
        "layer_sparsity": _layer_sparsity(out),
        "uplink_bytes_total": summary["uplink_bytes_total"],
        "downlink_bytes_total": summary["downlink_bytes_total"],
        "client_rounds": summary.get("client_rounds"),
        "problems": problems,
        "process_wall_time_s": summary.get("process_wall_time_s"),
        "accuracy_by_round": [round(r["accuracy"], 4) for r in rows],
    }


def _stats(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def aggregate(runs: list[dict[str, Any]], keys: list[str]) -> list[dict[str, Any]]:
    """Per variant: mean ± std over seeds; points lost and byte ratios paired with dense by seed."""
    by = {(r["variant"], r["seed"]): r for r in runs}
    table = []
    for key in keys:
        mine = sorted((r for r in runs if r["variant"] == key), key=lambda r: r["seed"])
        if not mine:
            continue
        row: dict[str, Any] = {"variant": key, "label": mine[0]["label"],
                               "overrides": mine[0]["overrides"],
                               "seeds": [r["seed"] for r in mine]}
        for metric in ("final_accuracy", "mean_accuracy_last5", "uplink_bytes_per_client_round",
                       "uplink_bytes_per_client_round_final", "downlink_bytes_per_client_round",
                       "compression_ratio_uplink", "final_sparsity"):
            row[metric] = _stats([r[metric] for r in mine])
        paired = [(r, by[(BASELINE, r["seed"])]) for r in mine if (BASELINE, r["seed"]) in by]
        if paired:
            row["paired_seeds"] = [r["seed"] for r, _ in paired]
            for metric in ("final_accuracy", "mean_accuracy_last5"):
                row[f"points_lost_{metric}"] = _stats(
                    [100 * (d[metric] - r[metric]) for r, d in paired])
            dense_up = statistics.fmean(d["uplink_bytes_per_client_round"] for _, d in paired)
            dense_up_final = statistics.fmean(
                d["uplink_bytes_per_client_round_final"] for _, d in paired)
            up = statistics.fmean(r["uplink_bytes_per_client_round"] for r, _ in paired)
            up_final = statistics.fmean(r["uplink_bytes_per_client_round_final"] for r, _ in paired)
            row["uplink_reduction_vs_dense_fp32"] = dense_up / up
            row["uplink_reduction_vs_dense_fp32_final"] = dense_up_final / up_final
        row["problems"] = {str(r["seed"]): r["problems"] for r in mine if r["problems"]}
        table.append(row)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--seeds", type=int, default=1, help="run seeds FIRST .. FIRST+N-1")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help=f"comma-separated keys among: {', '.join(VARIANTS)}")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/compression"))
    parser.add_argument("--reuse", action="store_true",
                        help="reuse finished runs in --out that have the same settings")
    parser.add_argument("--name", default="compression",
                        help="results file: benchmarks/results/NAME.json")
    args = parser.parse_args()
    keys = [k.strip() for k in args.variants.split(",") if k.strip()]
    unknown = [k for k in keys if k not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose among {list(VARIANTS)}")
    if BASELINE not in keys:
        print(f"note: {BASELINE!r} not in --variants: no points lost or reductions "
              f"unless its runs are reused", file=sys.stderr)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    command = " ".join(["python -m benchmarks.compression", *sys.argv[1:]])
    header = {"rounds": args.rounds, "seeds": seeds, "command": command,
              "common_settings": [f"federation.rounds={args.rounds}", *BASE,
                                  "task.seed=SEED", "fleet.seed=SEED"]}
    runs: list[dict[str, Any]] = []
    # Seeds outer, variants inner: a partial result is balanced across variants.
    for seed in seeds:
        order = [BASELINE] + [k for k in keys if k != BASELINE] if BASELINE in keys else keys
        for key in order:
            run = run_one(key, seed, args.rounds, args.out, args.reuse)
            runs.append(run)
            print(f"seed {seed} {key}: acc {run['final_accuracy']:.4f} "
                  f"last5 {run['mean_accuracy_last5']:.4f} "
                  f"up {run['uplink_bytes_per_client_round']:.0f} B"
                  f"{' (reused)' if run['reused'] else ''}"
                  f"{' PROBLEMS ' + str(run['problems']) if run['problems'] else ''}",
                  file=sys.stderr, flush=True)
            partial = {"benchmark": args.name, "machine": machine(), **header,
                       "complete": False, "table": aggregate(runs, keys), "runs": runs}
            RESULTS.mkdir(parents=True, exist_ok=True)
            (RESULTS / f"{args.name}.json").write_text(json.dumps(partial, indent=2) + "\n")
    emit(args.name, {**header, "complete": True, "table": aggregate(runs, keys), "runs": runs})


if __name__ == "__main__":
    main()
