"""Gate: the stochastic-depth gates, how drop probabilities are spread, and the surgery that installs them."""
