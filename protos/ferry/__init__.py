"""The ``ferry`` proto namespace; versions live in subpackages (``v1``)."""
