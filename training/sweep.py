"""Grid search: `python training/sweep.py --config configs/sweep.yaml [section.key=value ...]`."""

from mmgcs.runtime import configure_cpu_policy

configure_cpu_policy()  # before torch loads: GNU OpenMP reads the policy only then

from mmgcs.sweep import main  # noqa: E402

if __name__ == "__main__":
    main()
