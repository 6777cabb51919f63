"""The artifact format: manifest schema, weight specification, file integrity, compatibility.

Pure Python and numpy (jax only to read its version): what any reader of an artifact needs.
"""
