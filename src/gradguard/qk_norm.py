"""qk-layernorm: a LayerNorm on the queries and on the keys of attention, before their dot product.

Dehghani et al. 2023 ("Scaling Vision Transformers to 22 Billion Parameters") met, and Wortsman et al.
2023 ("Small-scale proxies for large-scale Transformer training instabilities", arXiv 2309.14322)
reproduced in small models at high learning rates, *attention-logit growth*: the logits
``z_ij = q_i . k_j / sqrt(d)`` grow with the query and key weights until the softmax is one-hot (the
attention entropy collapses) and the loss diverges. Normalising ``q`` and ``k`` over the head dimension
removes the weights' scale from the logits:

    q <- LN(q),  k <- LN(k)   =>   |z_ij| <= sqrt(d) * max|gamma_q| * max|gamma_k|   (biases left out)

since a LayerNorm output has norm ``sqrt(d)`` before its gain ``gamma``. The logits can still grow, but only
through the ``2 d`` gains. Wortsman et al. 2023 find that qk-layernorm makes the final loss much less
sensitive to the learning rate (their figure 1).

Recipe for an attention written by hand (nanoGPT-style, ``F.scaled_dot_product_attention``)::

    self.qk_norm = gg.qk_norm.QKLayerNorm(head_dim)          # in __init__
    ...
    q, k, v = (t.view(B, T, n_head, head_dim).transpose(1, 2) for t in (q, k, v))
    q, k = self.qk_norm(q, k)                                 # in forward, before the attention
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)

``nn.MultiheadAttention`` has no place for it (and its fused inference path would skip any hook): write
the attention out as above, ``in_proj`` split into ``q, k, v``. The norms are new parameters: add them
before training; on a trained model they change its function.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["QKLayerNorm"]


class QKLayerNorm(nn.Module):
    """``(LN_q(q), LN_k(k))``: one LayerNorm over the last (head) dimension of the queries, one of the keys.

    The gains and biases are shared by the heads (the shape of ``q`` and ``k`` is ``(..., head_dim)``,
    e.g. ``(batch, heads, time, head_dim)``). ``gg.regularize`` leaves them out of weight decay, as any
    LayerNorm.

    Args:
        head_dim: the size of one head's query and key vectors.
        eps: LayerNorm's epsilon.
    """

    def __init__(self, head_dim: int, eps: float = 1e-5):
        super().__init__()
        if not isinstance(head_dim, int) or head_dim < 1:
            raise ValueError(f"QKLayerNorm: head_dim must be an int >= 1, got {head_dim!r}")
        self.q_norm = nn.LayerNorm(head_dim, eps=eps)
        self.k_norm = nn.LayerNorm(head_dim, eps=eps)

    def forward(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        head_dim = self.q_norm.normalized_shape[0]
        if q.shape[-1] != head_dim or k.shape[-1] != head_dim:
            raise ValueError(f"QKLayerNorm: q and k must end with head_dim={head_dim}, got q {tuple(q.shape)} "
                             f"and k {tuple(k.shape)}")
        return self.q_norm(q), self.k_norm(k)
