"""The client: ClientApp, the local FedProx solver, the on-device runtime."""
