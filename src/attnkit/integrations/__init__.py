"""attnkit inside the models people use.

* :mod:`attnkit.integrations.transformers`: ``attn_implementation="attnkit"`` (and
  ``"attnkit:<mechanism>"``) for Hugging Face transformers models (``pip install attnkit[hf]``).
* :mod:`attnkit.integrations.timm`: :func:`~attnkit.integrations.timm.swap_attention` for timm's
  ViT-family models.

Neither peer library is imported until its integration is used.
"""
