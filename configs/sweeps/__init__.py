"""Sweep files for `perijax sweep --sweep configs/sweeps/NAME.py`: each defines `get_sweep()`
returning a base config, fixed overrides and a grid (docs/experiments.md)."""
