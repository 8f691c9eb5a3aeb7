"""SimSiam (Chen and He, CVPR 2021): projector, predictor, stop-gradient, negative cosine."""

from __future__ import annotations

from ltssl.methods.registry import register_method
from ltssl.methods.base import Method, mlp, negative_cosine


@register_method("simsiam")
class SimSiam(Method):
    """Projector ``out_dim -> proj_hidden_dim -> proj_dim`` (2 layers, BN after each, the CIFAR
    recipe's "2 x 2048"); predictor ``proj_dim -> pred_hidden_dim -> proj_dim`` (2048-512-2048).

    Pair loss: ``0.5 * (D(p_a, z_b) + D(p_b, z_a))`` with ``D = -cos(p, stopgrad(z))``; in [-1, 1].
    """

    def __init__(self, cfg, encoder, num_classes):
        super().__init__(cfg, encoder, num_classes)
        m, norm = cfg.method, cfg.model.norm
        self.projector = mlp([encoder.out_dim, m.proj_hidden_dim, m.proj_dim], norm, last_norm=True)
        self.predictor = mlp([m.proj_dim, m.pred_hidden_dim, m.proj_dim], norm, last_norm=False)

    def embed(self, view):
        z = self.projector(self.encoder(view))
        return {"z": z, "p": self.predictor(z)}

    def pair_loss(self, out_a, out_b, batch):
        return 0.5 * (negative_cosine(out_a["p"], out_b["z"]) + negative_cosine(out_b["p"], out_a["z"]))
