"""The check the SecAgg+ tests use to say "the server saw only masks" (tests/_uniform.py)
must pass a uniform vector nearly always and fail what an unmasked update looks like."""

import numpy as np
from _uniform import looks_uniform

SIZE = 387  # a masked CartPole 16,16 update: its weight and 386 coordinates


def _shares(vector: np.ndarray) -> tuple[float, float, int]:
    shares = vector.astype(np.float64) / 2**32
    return float(shares.mean()), float(shares.std()), int(shares.size)


def test_uniform_vectors_mod_2_32_pass_on_every_seed():
    draws = [np.random.default_rng(seed).integers(0, 2**32, SIZE, dtype=np.uint64)
             for seed in range(2000)]
    assert all(looks_uniform(*_shares(v)) for v in draws)


def test_an_unmasked_update_fails():
    """Small signed values wrapped mod 2**32 sit near 0 and 2**32: std near 1/2."""
    update = np.random.default_rng(0).normal(0, 1000, SIZE).astype(np.int64) % 2**32
    assert not looks_uniform(*_shares(update))


def test_a_quantised_update_near_the_middle_level_fails():
    """SecAgg+'s quantised coordinates cluster at 2**21 of 2**22, far from uniform."""
    update = 2**21 + np.random.default_rng(0).integers(-2**10, 2**10, SIZE)
    assert not looks_uniform(*_shares(update))
