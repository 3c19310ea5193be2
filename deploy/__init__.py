"""Ferry deploy package."""
