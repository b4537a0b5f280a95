"""Training recipes: one `get_config()` per file, starting from
`qgjt_jax.base_config` (the shared defaults).
"""
