"""Per-head attention patterns: every head (or head group) gets its own mask.

``s2`` (S2-Attention's per-head strided layouts), ``moa`` (Mixture of Sparse Attention's
per-head spans), ``moh`` (Mixture-of-Head gates).
"""
