"""perijax: pretraining decoder-only language models with the LayerNorm placement as a setting.

Placements (see docs/ln_variants.md): Pre-LN, Post-LN, Peri-LN (Kim et al., arXiv 2502.02732)
and the OLMo-2 output-only placement, all on one model code path.
"""

__version__ = "0.1.0"
