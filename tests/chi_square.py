"""Statistical tests shared by the tests of distribution-lossless decoding."""

import torch


def chi_square_p_value(counts, probs):
    """P-value of Pearson's chi-square statistic of counts against probs (cells with expectation >= 5; the rest
    pooled into one cell): the chi-square survival function, the regularised upper incomplete gamma function."""
    expected = probs.double() * counts.sum()
    cells = expected >= 5
    observed = torch.cat([counts[cells], counts[~cells].sum()[None]])
    expected = torch.cat([expected[cells], expected[~cells].sum()[None]])
    if expected[-1] < 5:  # too little pooled mass to be a cell of its own
        observed, expected = observed[:-1], expected[:-1]
    statistic = (((observed - expected) ** 2) / expected).sum()
    dof = observed.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), statistic / 2))
