"""arctl_gateway."""
