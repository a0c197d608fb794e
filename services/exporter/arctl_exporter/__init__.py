"""arctl_exporter."""
