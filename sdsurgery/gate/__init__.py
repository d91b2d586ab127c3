"""Gate: the stochastic-depth gates, how drop probabilities are spread, and the surgery that
installs them.

``gates`` (the gate module, :func:`decide`, the controller) and ``schedules``; ``surgery``
(:func:`convert`) -> ``plan`` (a program per block) -> ``rewrite`` (graph to code) -> ``install``
(and ``uninstall``).
"""
__all__: list[str] = []
