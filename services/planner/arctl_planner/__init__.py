"""arctl_planner."""
