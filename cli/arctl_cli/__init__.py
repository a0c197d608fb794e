"""arctl_cli."""
