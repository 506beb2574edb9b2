"""Routed attention: each query (or query block) picks the key blocks it attends to from the data.

``moba`` (MoBA), ``vmoba`` (VMoBA), ``psa`` (Pyramid Sparse Attention), ``hyper``
(HyperAttention), ``biformer`` (BiFormer's bi-level routing): each a functional op with its
paths and ``explain``.
"""
