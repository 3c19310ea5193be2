"""Ferry coordinator package."""
