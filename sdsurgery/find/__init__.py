"""Find: trace a model with torch.fx and find its residual connections."""
