"""``inpformer`` command line: check | prepare | synthesize | train | evaluate | predict | export | app | sweep |
noise | reproduce | pipeline | serve | serve-scoring | thresholds | review | gate | retrain.

Every command accepts ``--params PATH`` (default params.yaml) and repeated ``--set KEY=VALUE``;
the params are validated before any work starts.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from components.constants import DATASET_KINDS
from components.errors import DownloadError, EncoderWeightsError, ExportParityError, RuntimeMissingError
from components.files import DiskFullError, LockedError, disk_full_message, is_disk_full
from pipelines.config import ConfigError, Params, load_params
from pipelines.errors import CommandFailed
from pipelines.loop.commands import LOOP_COMMANDS, add_loop_parsers, dispatch_loop
from pipelines.tracking.runs import hermetic_env

__all__ = ["build_parser", "main"]

NOISY_LOGGERS = ("alembic", "mlflow", "urllib3", "httpx", "git", "PIL")
# What the user can fix (bad input, params, files, an unreachable host): one line, exit 1. Anything
# else (KeyError, RuntimeError, ...) is a bug: the traceback is shown.
USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    PermissionError,
    DownloadError,
    EncoderWeightsError,
    CommandFailed,
    ExportParityError,
    RuntimeMissingError,
    LockedError,
    DiskFullError,
)
MODEL_HELP = (
    "a model folder, registry URI (models:/inpformer@champion) or exported .onnx/.pt "
    "(default: the workspace's only model)"
)
INTERRUPTED_EXIT = 130  # 128 + SIGINT, as shells report it
TERMINATED_EXIT = 143  # 128 + SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM (what Prefect, systemd, Kubernetes and `kill` send), handled like Ctrl-C: MLflow runs end
    KILLED, temporary folders are removed, checkpoints are kept, the exit code is 143."""


def _on_sigterm(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a params key, e.g. --set model.num_prototypes=8 (repeatable)",
    )
    parser.add_argument("--no-progress", action="store_true", help="disable progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(prog="inpformer", description="INP-Former++ anomaly detection pipeline")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="validate params.yaml (the first DVC stage: nothing else runs on bad params)")
    _common(p)
    p = sub.add_parser("prepare", help="download/index a dataset into data/prepared/<name>/manifest.csv")
    _common(p)
    p.add_argument("--dataset", choices=(*DATASET_KINDS, "dtd"), help="dataset kind (default: data.dataset)")
    p.add_argument("--from", dest="source", help="archive or folder to use instead of downloading")
    p.add_argument("--name", help="prepared dataset name (default: data.name)")
    p = sub.add_parser("synthesize", help="write the fixed pseudo-anomaly bank data/synth/<name>/")
    _common(p)
    p = sub.add_parser("train", help="train INP-Former(++) into artifacts/models/")
    _common(p)
    p.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")
    p.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="data-parallel processes on this machine (torchrun; one per GPU, or gloo on CPU)",
    )
    p = sub.add_parser("evaluate", help="metrics, tables and plots into artifacts/")
    _common(p)
    p = sub.add_parser("sweep", help="Optuna study over params (sweep.space)")
    _common(p)
    p.add_argument("--n-trials", type=int, help="trials to run in this process (default sweep.n_trials)")
    p.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes on the same study")
    p.add_argument(
        "--apply", action="store_true", help="run the best params as a DVC experiment (full training), then stop"
    )
    p.add_argument("--name", dest="exp_name", help="experiment name for --apply (default: <study>-best)")
    p.add_argument(
        "--prefect-pool",
        help="run the workers as flow runs on this Prefect work pool (prefect worker start --pool NAME)",
    )
    p = sub.add_parser("predict", help="score new images: predictions.csv/.jsonl and overlays in the original frame")
    _common(p)
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="image files, folders (recursive) or globs")
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--out", default="predictions", help="output folder (default: predictions)")
    p.add_argument("--category", help="the images' category (default: from their folders)")
    p.add_argument("--limit", type=int, help="score at most this many images")
    p.add_argument(
        "--save-maps",
        nargs="?",
        const="npy",
        choices=("npy", "png16"),
        help="also write each map in the original frame: npy (float32, NaN outside the crop) or png16",
    )
    p.add_argument("--normalized", action="store_true", help="report scores normalised so that 0.5 is the threshold")
    p = sub.add_parser("export", help="export the model as ONNX or TorchScript, parity-checked against PyTorch")
    _common(p)
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--format", choices=("onnx", "torchscript", "openvino"), help="default: export.format")
    p.add_argument(
        "--int8",
        action="store_true",
        help="INT8 (export.int8_mode): openvino by NNCF, onnx by ONNX Runtime quantisation; "
        "gated on decisions (export.int8_min_agreement)",
    )
    p.add_argument("--opset", type=int, help="ONNX opset (default: export.opset)")
    p.add_argument("--dynamic-batch", action=argparse.BooleanOptionalAction, default=None, help="dynamic batch axis")
    p.add_argument("--out", help="target file (default: export.out_dir/model.onnx|.pt)")
    p = sub.add_parser("app", help="web inspector on 127.0.0.1: upload images, see overlay, score and decision")
    _common(p)
    p.add_argument("--model", action="append", help=MODEL_HELP + " (repeat to offer several)")
    p.add_argument("--host", help="default: serve.host (127.0.0.1)")
    p.add_argument("--port", type=int, help="default: serve.port")
    p = sub.add_parser("serve-scoring", help="Prefect deployment: score new images of a watched folder on a cron")
    _common(p)
    p.add_argument("--watch", required=True, help="folder whose new images are scored")
    p.add_argument("--cron", default="*/10 * * * *", help='cron schedule (default "*/10 * * * *")')
    p.add_argument("--model", help=MODEL_HELP + " (default: models:/<registered_model>@champion)")
    p.add_argument("--out", help="output folder (default: serve.watch_out)")
    p.add_argument("--name", default="scoring", help="deployment name")
    p.add_argument("--once", action="store_true", help="run the flow once now instead of serving the schedule")
    p = sub.add_parser("noise", help="the noise floor: train k seeds of the config, mean ± std per metric")
    _common(p)
    p.add_argument("--seeds", type=int, default=3, help="seeds to train (seed, seed+1, ...; default 3)")
    p = sub.add_parser("reproduce", help="rebuild a registered version from its record and compare its metrics")
    _common(p)
    p.add_argument("ref", help="models:/<name>@<alias>, models:/<name>/<version>, runs:/<run id>/... or a run id")
    p.add_argument("--keep", action="store_true", help="keep the scratch worktree (its path is printed)")
    p = sub.add_parser("pipeline", help="run the Prefect pipeline flow once (DVC stages as tasks)")
    _common(p)
    p = sub.add_parser("serve", help="serve the Prefect pipeline flow with a cron schedule")
    _common(p)
    p.add_argument("--cron", default="0 2 * * *", help='cron schedule (default "0 2 * * *")')
    p.add_argument("--name", default="nightly", help="deployment name")
    add_loop_parsers(sub, _common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = build_parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    hermetic_env(os.getcwd())
    try:
        params = load_params(args.params, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    progress = not args.no_progress and sys.stderr.isatty()
    warnings.filterwarnings("ignore", category=FutureWarning, module="mlflow")
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _dispatch(args, params, progress)
    except USER_ERRORS as err:
        if args.verbose:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `inpformer review list | head`: the reader left; not an error
        sys.stderr.close()
        return 0
    except OSError as err:
        if not is_disk_full(err):
            raise
        print(f"error: {disk_full_message(err.filename or '.', err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        what = "terminated (SIGTERM)" if isinstance(err, Terminated) else "interrupted"
        print(
            f"\n{what}; rerun `inpformer {args.command}` to resume (finished outputs and checkpoints are kept).",
            file=sys.stderr,
        )
        return TERMINATED_EXIT if isinstance(err, Terminated) else INTERRUPTED_EXIT


def argv_without_nproc(argv: list[str]) -> list[str]:
    """A command's arguments without ``--nproc N`` (what every rank runs)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def _torchrun(nproc: int, args: list[str]) -> int:
    """Run ``inpformer <args>`` as ``nproc`` ranks under torchrun on this machine; its exit code."""
    import subprocess  # only for --nproc

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return subprocess.run([*cmd, "-m", "pipelines.cli", *args], check=False).returncode


def _dispatch(args: argparse.Namespace, params: Params, progress: bool) -> int:
    from pipelines import stages  # torch and the stages: not needed for --help or a params error

    if args.command in LOOP_COMMANDS:
        return dispatch_loop(args, params)
    if args.command == "check":
        stages.check(params)
    elif args.command == "prepare":
        stages.prepare(params, args.source, args.dataset, args.name)
    elif args.command == "synthesize":
        stages.synthesize(params, progress)
    elif args.command == "train" and args.nproc > 1:
        return _torchrun(args.nproc, argv_without_nproc(args.argv))
    elif args.command == "train":
        stages.train(params, progress=progress, resume=not args.no_resume)
    elif args.command == "evaluate":
        stages.evaluate(params, progress=progress)
    elif args.command == "sweep":
        from pipelines.sweep.apply import apply_best
        from pipelines.sweep.study import run_sweep  # optuna: imported only by the commands that need it

        if args.apply:
            return apply_best(params, args.params, args.exp_name, args.overrides)
        if args.prefect_pool:
            params.sweep.prefect_pool = args.prefect_pool
        run_sweep(params, args.params, args.overrides, args.n_trials, args.timeout, args.workers, progress)
    elif args.command == "predict":
        from pipelines.serve.predict import predict_images  # not needed by the other commands

        options = {
            "model": args.model,
            "category": args.category,
            "limit": args.limit,
            "save_maps": args.save_maps,
            "normalized": args.normalized,
        }
        predict_images(params, args.sources, args.out, options, progress)
    elif args.command == "export":
        from pipelines.serve.export import export  # onnx: imported only by the commands that need it

        sets = {"format": args.format, "opset": args.opset, "dynamic_batch": args.dynamic_batch}
        params.export = params.export.model_copy(update={k: v for k, v in sets.items() if v is not None})
        export(params, args.model, args.out, progress, int8=args.int8)
    elif args.command == "app":
        from pipelines.serve.app import run_app  # fastapi/uvicorn: imported only here

        run_app(params, args.model or [], args.host, args.port)
    elif args.command == "serve-scoring":
        from pipelines.serve.scoring import run_once, serve_scoring  # prefect: imported only here

        if args.once:
            summary = run_once(args.watch, args.model, args.out, args.overrides, args.params)
            print(f"scored {summary['scored']} new image(s), {summary['flagged']} flagged ({summary['version']})")
        else:
            serve_scoring(args.watch, args.cron, args.model, args.out, args.name, args.overrides, args.params)
    elif args.command == "noise":
        from pipelines.repro.noise import measure_noise  # trains: imported only here

        measure_noise(params, args.seeds, progress)
    elif args.command == "reproduce":
        from pipelines.repro.reproduce import reproduce  # git/dvc: imported only here

        return reproduce(params, args.ref, keep=args.keep)
    elif args.command == "pipeline":
        from pipelines.flows import pipeline  # prefect: imported only by the commands that need it

        pipeline(overrides=args.overrides, params_path=args.params)
    elif args.command == "serve":
        from pipelines.flows import serve  # prefect: imported only by the commands that need it

        serve(args.cron, args.name, args.params)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
