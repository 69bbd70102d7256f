"""Shipped config files (installed as the `perijax.configs` package, so `--config configs/x.py`
also works outside a source checkout)."""
