"""arctl_tuner."""
