"""Train the image model: `accelerate launch training/train_image.py [--config FILE] [section.key=value ...]`."""

from pathlib import Path

from mmgcs.engine import main

if __name__ == "__main__":
    main(default_config=Path(__file__).resolve().parents[1] / "configs" / "image.yaml")
