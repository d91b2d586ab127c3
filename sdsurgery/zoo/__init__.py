"""Models sdsurgery ships: the paper's CIFAR / SVHN ResNets (registered on import)."""
__all__: list[str] = []
