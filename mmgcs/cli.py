"""The `mmgcs` command (`python -m mmgcs` the same): one entry point over what the project already has.

`predict` (mmgcs.batch_predict; in several processes, `--num-processes N` or under `accelerate launch -m mmgcs
predict`: mmgcs.sharded_predict) and `doctor` (mmgcs.doctor) live here; `evaluate`, `data`, `sweep` hand their
arguments to the existing module's own `main`, so each command has one parser and one behaviour; `serve` runs the
Space's app.py. Training stays `accelerate launch training/train_*.py`, because accelerate must start the processes.
"""

from __future__ import annotations

from mmgcs.runtime import configure_cpu_policy

configure_cpu_policy()  # before torch loads (the imports below): GNU OpenMP reads the policy only then

import argparse  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from typing import Optional, Sequence  # noqa: E402

from mmgcs import batch_predict, doctor, evaluate, resources, sharded_predict, sweep  # noqa: E402
from mmgcs.data import __main__ as data_cli  # noqa: E402
from mmgcs.progress import set_quiet  # noqa: E402

TRAINING = """training (accelerate starts the processes, so it is not an mmgcs subcommand):
  accelerate launch training/train_fusion.py    plot + poster (configs/fusion.yaml)
  accelerate launch training/train_text.py      plot only     (configs/text.yaml)
  accelerate launch training/train_image.py     poster only   (configs/image.yaml)
  options: --config FILE, --fast, --resume, --push-to-hub REPO_ID, section.key=value overrides

`mmgcs COMMAND --help` shows a command's options."""

# Subcommands whose arguments go untouched to an existing module's own command line.
DELEGATED = {
    "evaluate": ("score a trained model on a built dataset split or a labelled source (python -m mmgcs.evaluate)",
                 lambda argv: _returned(evaluate.main(argv))),
    "data": ("build | push a movie dataset (python -m mmgcs.data)", lambda argv: data_cli.main(argv)),
    "sweep": ("grid search over a sweep file (training/sweep.py)", lambda argv: _returned(sweep.main(argv))),
}


def _returned(_result) -> int:
    """The delegated mains return their results (or exit with a message); having returned is success."""
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmgcs", description="MMGCS: movie plot and/or poster -> genres.",
                                epilog=TRAINING, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    predict = sub.add_parser("predict", help="run a trained model over a CSV / JSONL / poster folder / built dataset",
                             description=batch_predict.__doc__.split("\n\n")[0])
    batch_predict.add_arguments(predict)
    add_quiet_flag(predict)
    for name, (summary, _) in DELEGATED.items():
        sub.add_parser(name, help=summary, add_help=False)
    serve = sub.add_parser("serve", help="serve the Space's page (app.py) locally",
                           description="Runs app.py with this environment (MMGCS_MODEL, MMGCS_EXAMPLES, "
                                       "GRADIO_SERVER_NAME, GRADIO_SERVER_PORT, ...); the options set those variables.")
    serve.add_argument("--model", help="model folder or Hub id (sets MMGCS_MODEL)")
    serve.add_argument("--host", help="address to listen on (sets GRADIO_SERVER_NAME)")
    serve.add_argument("--port", type=int, help="port (sets GRADIO_SERVER_PORT)")
    check = sub.add_parser("doctor", help="check the environment: versions, devices, backbones, Hub, cache, browser")
    doctor.add_arguments(check)
    return p


def add_quiet_flag(parser: argparse.ArgumentParser) -> None:
    """`--quiet` on a command that runs long steps (unless its own arguments have it already)."""
    if "--quiet" not in parser._option_string_actions:
        parser.add_argument("--quiet", action="store_true",
                            help="no progress bars, in this process and those it starts (sets MMGCS_QUIET=1)")


def serve(args: argparse.Namespace) -> int:
    app = resources.space_app()  # the editable checkout's app.py, else the current folder's
    if app is None:
        print(f"error: app.py not found: {resources.SERVE_REMEDY}", file=sys.stderr)
        return 2
    env = dict(os.environ)
    for value, name in ((args.model, "MMGCS_MODEL"), (args.host, "GRADIO_SERVER_NAME"), (args.port, "GRADIO_SERVER_PORT")):
        if value is not None:
            env[name] = str(value)
    try:
        return subprocess.call([sys.executable, str(app)], env=env, cwd=app.parent)
    except KeyboardInterrupt:
        return 130


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        return DELEGATED[argv[0]][1](argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "predict":
        if args.quiet:  # the policy of every bar (mmgcs.progress), inherited by the parts a sharded run starts
            set_quiet()
            args.no_progress = True
        if sharded_predict.sharded(args):  # --num-processes N, or a process of `accelerate launch -m mmgcs predict`
            return sharded_predict.main(args, argv)
        return batch_predict.main(args)
    if args.command == "serve":
        return serve(args)
    return doctor.main(args)


if __name__ == "__main__":
    sys.exit(main())
