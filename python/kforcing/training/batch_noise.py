"""The noise of distillation batches: a training window's uniforms and temperature, and boundary draws.

Noise is counter-based (`kforcing.noise`): batch `step` of stage s is a pure function of (seed, s, step, sample
index), so resuming mid-stage continues exactly and any number of DDP ranks sees the same global batch. Every
student's distillation draws its windows' uniforms here.
"""

import torch

from ..noise import counter_uniform

# Seeds of the counter-based streams (XORed with the run's seed): training noise, temperatures, boundary draws.
_NOISE_KEY = 0x6B66_0001
_TAU_KEY = 0x6B66_0002
_BOUNDARY_KEY = 0x6B66_0003




def batch_noise(seed, stage, sample_keys, windows, k, tau_range):
    """(u (B, windows, k) float64, tau (B,) float32) of the samples `sample_keys` (B,) int64 in stage `stage`.

    u[b, t, j] = counter_uniform(seed ^ NOISE ^ stage, sample_keys[b], t * k + j); tau from its own stream,
    uniform in tau_range. A pure function of its arguments: exact resumption and DDP need nothing else.
    """
    device = sample_keys.device
    stream = (seed ^ _NOISE_KEY) + (stage << 20)
    position = (torch.arange(windows, device=device)[:, None] * k + torch.arange(k, device=device))[None]
    u = counter_uniform(stream, sample_keys[:, None, None], position)
    low, high = tau_range
    if low == high:
        tau = torch.full((len(sample_keys),), float(low), dtype=torch.float32, device=device)
    else:
        r = counter_uniform((seed ^ _TAU_KEY) + (stage << 20), sample_keys, 0)
        tau = (low + (high - low) * r).to(torch.float32)
    return u, tau


def boundary_draws(seed, stage, first_key, shape, beta, device):
    """(shape) float64 Beta(beta, beta) draws of the micro-batch whose first sample key is first_key (int).

    The draws that place boundary-weighted uniforms inside their tokens' intervals (kforcing.students.draft.targets).
    They come from the CPU generator under a seed mixed from (seed, stage, first_key), inside fork_rng, so they are a
    pure function of those (exact resumption) and leave the global random state alone.
    """
    mixed = ((seed ^ _BOUNDARY_KEY) * 1_000_003 + stage) * 2_147_483_647 + int(first_key)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(mixed % (1 << 63))
        draws = torch.distributions.Beta(float(beta), float(beta)).sample(torch.Size(shape))
    return draws.double().to(device)


__all__ = ["batch_noise", "boundary_draws"]
