"""The manual's pages; generate.py fills their generated blocks (make docs)."""
