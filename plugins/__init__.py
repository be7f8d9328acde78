"""cul8er's built-in plugins, grouped by type."""
