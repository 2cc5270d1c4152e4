"""Train the image model: `accelerate launch training/train_image.py [--config FILE] [section.key=value ...]`."""

from pathlib import Path

from mmgcs.runtime import configure_cpu_policy

configure_cpu_policy()  # before torch loads: GNU OpenMP reads the policy only then

from mmgcs.engine import main  # noqa: E402

if __name__ == "__main__":
    main(default_config=Path(__file__).resolve().parents[1] / "configs" / "image.yaml")
