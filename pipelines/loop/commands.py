"""The inspection loop's commands: ``thresholds``, ``review``, ``gate``, ``retrain``; and ``benchmark``."""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipelines.config import Params

__all__ = ["LOOP_COMMANDS", "add_loop_parsers", "dispatch_loop"]

LOOP_COMMANDS = ("thresholds", "review", "gate", "retrain", "benchmark")
MODEL_REF_HELP = "registered model version (default: models:/<tracking.registered_model>@champion)"


def add_loop_parsers(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add the loop's subcommands to the ``inpformer`` parser."""
    p = sub.add_parser(
        "thresholds", help="audited threshold versions of a registered model: show | history | set | approve"
    )
    common(p)
    p.add_argument("action", choices=("show", "history", "set", "approve"))
    p.add_argument("--model", help=MODEL_REF_HELP)
    p.add_argument("--category", help="set: the category")
    p.add_argument("--image", type=float, help="set: the new image (reject) threshold, on the raw score scale")
    p.add_argument("--review", type=float, help="set: the review band's lower end (below --image)")
    p.add_argument("--reason", default="", help="set/approve: why (required for set: the audit trail)")
    p.add_argument("--draft", action="store_true", help="set: write a draft that `approve N` makes effective")
    p.add_argument("--number", type=int, help="approve: the draft's version number")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = sub.add_parser("review", help="the review queue: list flagged images, mark verdicts (they become data)")
    common(p)
    p.add_argument("action", choices=("list", "mark", "verdicts"))
    p.add_argument("item", nargs="?", help="mark: the queued image's id (or a prefix) or its path")
    p.add_argument("--verdict", choices=("normal", "defect"), help="mark: the operator's verdict")
    p.add_argument("--defect", help="mark --verdict defect: the defect type (default review.defect_type)")
    p.add_argument("--reason", default="", help="mark: a note kept in the ledger")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = sub.add_parser("gate", help="promotion gate: candidate vs champion (metric, export parity, latency)")
    common(p)
    p.add_argument("--candidate", help="default: models:/<registered_model>@candidate")
    p.add_argument("--champion", help="default: models:/<registered_model>@champion")
    p.add_argument("--no-promote", action="store_true", help="only report")
    p = sub.add_parser("benchmark", help="latency p50/p95/p99, throughput, memory, size, agreement per runtime")
    common(p)
    p.add_argument("--model", help="a model folder or registry URI (default: the workspace's only model)")
    p.add_argument("--runs", type=int, default=50, help="batch-1 calls timed per runtime (default 50)")
    p = sub.add_parser("retrain", help="Prefect flow: rerun the pipeline as a DVC experiment, then the gate")
    common(p)
    p.add_argument("--reason", default="manual")
    p.add_argument("--serve", action="store_true", help="serve the flow as a deployment (run it from the Prefect UI)")
    p.add_argument("--cron", help='--serve: also on this schedule, e.g. "0 3 * * 0"')
    p.add_argument("--name", default="retrain", help="--serve: deployment name")


def _print(rows: list[dict[str, Any]], as_json: bool, columns: tuple[str, ...]) -> None:
    if as_json:
        print(json.dumps(rows, indent=2, default=lambda v: None))
        return
    if not rows:
        print("(none)")
        return
    cells = [[_cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    for line in [list(columns), *cells]:
        print("  ".join(v.ljust(w) for v, w in zip(line, widths)))


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def dispatch_loop(args: argparse.Namespace, p: Params) -> int:
    """Run one loop command; its exit code."""
    ref = getattr(args, "model", None) or f"models:/{p.tracking.registered_model}@champion"
    if args.command == "thresholds":
        from pipelines.loop import thresholds as t

        if args.action == "show":
            _print(
                t.show(p, ref), args.json, ("category", "image_threshold", "review_threshold", "rule", "review_rule")
            )
        elif args.action == "history":
            cols = ("version", "category", "image_threshold", "review_threshold", "status", "user", "time", "reason")
            _print(t.history(p, ref), args.json, cols)
        elif args.action == "set":
            if not args.category or args.image is None:
                raise ValueError("thresholds set needs --category and --image (and --reason).")
            entry = t.set_threshold(p, ref, args.category, args.image, args.review, args.reason, args.draft)
            print(f"t{entry['version']:04d} ({entry['status']}) of {ref}: {args.category} → {args.image:g}")
        else:
            if args.number is None:
                raise ValueError("thresholds approve needs --number N (see `inpformer thresholds history`).")
            entry = t.approve(p, ref, args.number, args.reason)
            print(f"threshold version t{entry['version']:04d} approves t{args.number:04d}")
    elif args.command == "review":
        from pipelines.loop import review as r

        if args.action == "list":
            cols = ("id", "category", "score", "action", "version", "path")
            _print(r.pending(p), args.json, cols)
        elif args.action == "verdicts":
            _print(r.verdicts(p), args.json, ("id", "category", "verdict", "defect", "file", "user", "time"))
        else:
            if not args.item or not args.verdict:
                raise ValueError("review mark needs an item (id or path) and --verdict normal|defect.")
            entry = r.mark(p, args.item, args.verdict, args.defect, args.reason)
            print(f"{entry['id']}: {entry['verdict']} → {p.review.dir}/{entry['file']} (prepare sees it: dvc repro)")
    elif args.command == "benchmark":
        from pipelines.serve.benchmark import benchmark  # onnx/openvino: only here

        benchmark(p, args.model, args.runs)
    elif args.command == "gate":
        from pipelines.loop.gate import gate

        result = gate(p, args.candidate or "", args.champion or "", promote=not args.no_promote)
        return 0 if result["passed"] else 3
    else:
        from pipelines.loop.retrain import retrain_flow  # prefect: only here

        if args.serve:
            parameters = {"root": os.getcwd(), "reason": "deployment", "params_path": str(Path(args.params).resolve())}
            retrain_flow.serve(name=args.name, cron=args.cron, parameters=parameters, limit=1)
            return 0
        result = retrain_flow(root=os.getcwd(), reason=args.reason, params_path=args.params)
        return 0 if result["passed"] else 3
    return 0
