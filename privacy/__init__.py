"""Privacy: secure aggregation (SecAgg+ on the Message API) and DP."""
