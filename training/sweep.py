"""Grid search: `python training/sweep.py --config configs/sweep.yaml [section.key=value ...]`."""

import sys

from mmgcs.runtime import configure_cpu_policy

configure_cpu_policy()  # before torch loads: GNU OpenMP reads the policy only then

from mmgcs import interrupts  # noqa: E402
from mmgcs.sweep import main  # noqa: E402

if __name__ == "__main__":
    rerun = interrupts.rerun_command()  # the same command continues: finished points are kept, the others resume
    with interrupts.stop_on_signals():
        try:
            main()
        except KeyboardInterrupt as e:  # Ctrl-C / SIGTERM: one line, as a training script ends (mmgcs.engine.main)
            print(f"{getattr(e, 'where', 'interrupted')}; rerun to continue the sweep: {rerun}", file=sys.stderr)
            sys.exit(getattr(e, "exit_code", 130))
