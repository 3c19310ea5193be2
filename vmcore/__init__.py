"""Ferry vmcore package."""
