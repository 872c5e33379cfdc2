"""Drop-in nn.Modules built on the kforcing ops."""

import torch
from torch import nn

from .embedding import noise_conditioned_embedding, noise_embedding


class NoiseEmbedding(nn.Module):
    """e(u, tau): the input vector of a K-Forcing hint row (METHOD.md section 2).

    x = noise_embedding(u, tau, weight, bias)    sinusoidal features of u and tau + Linear, fused
    e = x + MLP(LayerNorm(x))                    a residual GELU MLP

    Args:
        hidden: H, the model width.
        num_freqs: F, frequencies per sinusoid; the Linear maps 4F features to H. Default H // 2 (4F = 2H).
        mlp_ratio: the MLP's hidden width is mlp_ratio * H.

    Init: weight ~ N(0, 0.02) and bias = 0, as a token embedding (features are cos/sin, so the output has the
    scale of an embedding row); the MLP's output layer is zero, so at initialisation e = x and the residual
    MLP starts as the identity.
    """

    def __init__(self, hidden, num_freqs=None, mlp_ratio=4, device=None, dtype=None):
        super().__init__()
        self.num_freqs = num_freqs or max(1, hidden // 2)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(hidden, 4 * self.num_freqs, **factory))
        self.bias = nn.Parameter(torch.empty(hidden, **factory))
        self.norm = nn.LayerNorm(hidden, **factory)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, mlp_ratio * hidden, **factory),
            nn.GELU(),
            nn.Linear(mlp_ratio * hidden, hidden, **factory),
        )
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.normal_(self.weight, std=0.02)
        nn.init.zeros_(self.bias)
        nn.init.normal_(self.mlp[0].weight, std=0.02)
        nn.init.zeros_(self.mlp[0].bias)
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def residual(self, x):
        return x + self.mlp(self.norm(x))

    def forward(self, u, tau):
        """u: any shape (...) in [0, 1]; tau: a float or a tensor broadcastable to u. Returns (..., H)."""
        tau = torch.broadcast_to(tau, u.shape).reshape(-1) if isinstance(tau, torch.Tensor) else tau
        x = noise_embedding(u.reshape(-1), tau, self.weight, self.bias)
        return self.residual(x.view(*u.shape, -1))

    def embed_sequence(self, token_ids, token_table, u, tau):
        """[token_table[token_ids] | e(u, tau)]: (B, Tc + Th, H), a model's whole input sequence."""
        x = noise_conditioned_embedding(token_ids, token_table, u, tau, self.weight, self.bias)
        contexts = token_ids.shape[1]
        return torch.cat([x[:, :contexts], self.residual(x[:, contexts:])], dim=1)

    def extra_repr(self):
        return f"hidden={self.weight.shape[0]}, num_freqs={self.num_freqs}, init_std=0.02"


__all__ = ["NoiseEmbedding"]
