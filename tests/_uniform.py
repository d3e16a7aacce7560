"""One check shared by the SecAgg+ tests: does a masked vector look uniform mod 2**32?"""

import math


def looks_uniform(mean: float, std: float, size: int) -> bool:
    """Mean and standard deviation of ``size`` draws (as shares of 2**32) within six
    standard errors of a uniform's (1/2, sqrt(1/12)): a false alarm once in ~10**8
    vectors. (A fixed bound, mean within 0.05, was 3.4 standard errors at 387 draws and
    failed a correct run.) An unmasked update fails: its small values and their wrapped
    negatives sit near 0 and 1, a standard deviation near 1/2; a quantised update sits
    near the middle level, a standard deviation near 0."""
    uniform_std = math.sqrt(1 / 12)
    mean_error = uniform_std / math.sqrt(size)
    std_error = math.sqrt((1 / 80 - 1 / 144) / (4 * (1 / 12) * size))  # of the sample std
    return abs(mean - 0.5) < 6 * mean_error and abs(std - uniform_std) < 6 * std_error
