"""Windowed image attention that is not neighborhood attention: HaloNet's blocked halos,
MaxViT's block / grid axes, CCNet's criss-cross paths."""
