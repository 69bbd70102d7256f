"""Experiments over many runs: `perijax sweep` runs grids of training runs from a sweep file
(`grid`), `perijax report` turns their files into tables (`report`) and figures (`figures`), and
`runlog` reads a run back from its workdir. Commands on top of the library: nothing in the library
imports this package (docs/experiments.md).
"""
