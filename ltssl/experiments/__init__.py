"""The paper's experiments beyond a plain sweep table.

:mod:`ltssl.experiments.semisynthetic`: the semi-synthetic experiment of Liu et al. (ICLR 2022,
sec. 3.3): SSL vs supervised vs supervised-on-rare-only vs random features, evaluated on the
rare classes, and Grad-CAM maps of the SSL and supervised encoders.
"""
