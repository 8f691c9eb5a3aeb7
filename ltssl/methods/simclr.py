"""SimCLR (Chen, Kornblith, Norouzi and Hinton, ICML 2020): projector + NT-Xent."""

from __future__ import annotations

from ltssl.methods.registry import register_method
from ltssl.methods.base import Method, mlp, nt_xent


@register_method("simclr")
class SimCLR(Method):
    """Projector ``out_dim -> proj_hidden_dim -> proj_dim`` (norm + ReLU between).

    Pair loss: symmetric NT-Xent (:func:`ltssl.methods.base.nt_xent`) with negatives from the
    global batch (gathered across ranks, gradients included) and the temperature
    ``cfg.method.temperature`` or the per-sample ``sample_temperature(batch)``.
    """

    def __init__(self, cfg, encoder, num_classes):
        super().__init__(cfg, encoder, num_classes)
        m = cfg.method
        self.projector = mlp([encoder.out_dim, m.proj_hidden_dim, m.proj_dim], cfg.model.norm, last_norm=False)

    def embed(self, view):
        return {"z": self.projector(self.encoder(view))}

    def pair_loss(self, out_a, out_b, batch):
        return nt_xent(out_a["z"], out_b["z"], self.temperature_for(batch))
