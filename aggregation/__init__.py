"""Aggregation: combining decoded updates (weighted FedProx/FedAvg averaging)."""
