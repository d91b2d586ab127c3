"""Find: trace a model with torch.fx and find its residual connections.

``tracing`` (flat fx traces, leaves) -> ``graph`` (facts about a graph) -> ``candidates`` (an add
read as shortcut + branch) -> ``rules`` (named rejections) -> ``classify`` (one graph) ->
``residuals`` (:func:`analyse` / :func:`find_residuals`, with the search of untraceable leaves).
"""
__all__: list[str] = []
