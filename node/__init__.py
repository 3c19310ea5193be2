"""Ferry node package."""
