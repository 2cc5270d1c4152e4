"""Grid search: `python training/sweep.py --config configs/sweep.yaml [section.key=value ...]`."""

from mmgcs.sweep import main

if __name__ == "__main__":
    main()
