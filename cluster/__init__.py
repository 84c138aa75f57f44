"""How a job reaches Ray: an embedded local cluster or an existing one, and the CLI."""
