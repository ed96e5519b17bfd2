"""The coordinator: ServerApp round loop, client selection, work plans, the CLI."""
