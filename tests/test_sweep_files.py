"""The sweep files the repository ships (configs/sweep.yaml, configs/sweeps/*.yaml) hold only keys and values the
config accepts: every point's config resolves, as `training/sweep.py` resolves them all before training any."""

from __future__ import annotations

import pytest

from engine_helpers import REPO_ROOT
from mmgcs.config import load_config
from mmgcs.sweep import grid_points, load_sweep, point_names, point_overrides

SWEEPS = [REPO_ROOT / "configs" / "sweep.yaml", *sorted((REPO_ROOT / "configs" / "sweeps").glob("*.yaml"))]


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.relative_to(REPO_ROOT).as_posix())
def test_every_point_of_a_shipped_sweep_resolves(path):
    sweep = load_sweep(path)
    points = grid_points(sweep.grid)
    names = point_names(points)
    assert len(set(names)) == len(points)  # each point trains in its own folder
    for point, name in zip(points, names):
        cfg = load_config(sweep.base, point_overrides(sweep, point, [], sweep.output_dir / name))
        for key, value in point.items():
            section, field = key.split(".")
            got = getattr(getattr(cfg, section), field)
            # PyYAML reads 1e-4 as a string; the config coerces it to the field's type
            assert got == (type(got)(value) if isinstance(value, str) else value), (path.name, key)


def test_the_macro_f1_sweep_is_the_studys_grid():
    # docs/results/macro-f1.md: the losses with the lexical prior counted twice or once, on the default fused model.
    sweep = load_sweep(REPO_ROOT / "configs" / "sweeps" / "macro-f1.yaml")
    assert sweep.base == [(REPO_ROOT / "configs" / "fusion.yaml").resolve()]
    assert sweep.grid == {"train.loss": ["bce", "focal", "asymmetric"], "train.lexical_prior_once": [False, True],
                          "train.seed": [42, 43, 44]}
