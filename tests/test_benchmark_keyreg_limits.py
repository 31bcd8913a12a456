"""The key regression's limits benchmark: its points, its start and its noise scaling."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from keyreg_limits import make_start, parse_point, scale_noise  # noqa: E402


def test_points_parse_and_bad_ones_are_refused():
    assert parse_point("1:0.1") == (1.0, 0.1)
    assert parse_point("4:1") == (4.0, 1.0)
    for bad in ("0.5:1", "1:0", "1:1.5", "x:1", "1"):
        with pytest.raises(SystemExit, match="bad point"):
            parse_point(bad)


def test_the_start_is_right_on_its_share_and_uniform_elsewhere():
    truth = np.arange(20_000)
    start = make_start(truth, truth, 0.1, np.random.default_rng(0))
    assert abs((start == truth).mean() - 0.1) < 0.01
    wrong = start[start != truth]
    assert np.bincount(wrong).max() < 10                # spread over the pool (18,000 draws of 20,000 ids)


def test_scaling_multiplies_each_rows_own_noise():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(4000, 16, generator=g, dtype=torch.float64)
    K = torch.randn(16, 24, generator=g, dtype=torch.float64)
    noise = 0.3 * torch.randn(4000, 16, generator=g, dtype=torch.float64) @ K
    Y = (X @ K + noise).float()
    assert scale_noise(X, Y, 1) is Y
    scaled = scale_noise(X, Y, 3).double()
    # the new noise is 3x the old draw, less the sliver the fit absorbs (16 of 4,000 dimensions)
    rel = float(((scaled - X @ K) - 3 * noise).norm() / (3 * noise).norm())
    assert rel < 0.1
    assert float((scaled - Y.double()).norm() / noise.norm()) == pytest.approx(2, rel=0.05)


def test_least_squares_on_the_right_pairs_fits_the_scaled_tables_own_key():
    """The scaled noise is orthogonal to the plain rows' span: the untrimmed fit from the right reading is the key
    the scaled table is written with, so its read is the right key's."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(3000, 12, generator=g, dtype=torch.float64)
    K = torch.randn(12, 20, generator=g, dtype=torch.float64)
    Y = (X @ K + 0.5 * torch.randn(3000, 20, generator=g, dtype=torch.float64)).float()
    before = torch.linalg.lstsq(X, Y.double()).solution
    after = torch.linalg.lstsq(X, scale_noise(X, Y, 16).double()).solution
    assert float((after - before).norm() / before.norm()) < 1e-5
    assert float((before - K).norm() / K.norm()) > 1e-3          # not the writer's own K: the fit's share of noise


def test_each_fits_choice_names_readings_the_attack_makes():
    from aloe.attacks.key_regression import FITS as names
    from keyreg_limits import FIT_LABELS, READINGS

    assert set(FIT_LABELS) == set(READINGS)
    assert READINGS["all"] == names
    assert all(r and set(r) <= set(names) for r in READINGS.values())
