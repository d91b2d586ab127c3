"""Models in and out: where models come from (registry, timm, torchvision, factories), weights, the checkpoint format."""
__all__: list[str] = []
