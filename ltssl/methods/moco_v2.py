"""MoCo v2 (Chen, Fan, Girshick and He, 2020): momentum key encoder, negative queue, InfoNCE."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from ltssl.methods.registry import register_method
from ltssl.methods.base import Method, gather_no_grad, info_nce, mlp


@register_method("moco_v2")
class MoCoV2(Method):
    """Query encoder + MLP head ``out_dim -> proj_hidden_dim -> proj_dim``; a key copy of both
    updated as ``k <- m k + (1 - m) q`` (``cfg.method.moco_momentum``); a queue of
    ``moco_queue_size`` L2-normalised keys.

    Pair loss (symmetrised): ``0.5 * (InfoNCE(q_a, k_b) + InfoNCE(q_b, k_a))`` against the queue.

    Once per optimizer step, whatever the optimizer: the momentum update happens in the
    ``update_state=True`` pass (SAM's first), whose keys are reused by the perturbed pass
    (the key encoder is not perturbed, so recomputing them would change nothing but the
    cost); ``end_step()`` enqueues view 0's keys of the whole (global) batch, so both SAM
    passes see the same queue. (The authors' rwSAM code updated and enqueued twice.)
    Not implemented: shuffling BN across GPUs (MoCo's guard against BN leaking batch
    information); with SyncBatchNorm on GPUs the key encoder's statistics are global.
    """

    def __init__(self, cfg, encoder, num_classes):
        super().__init__(cfg, encoder, num_classes)
        m = cfg.method
        self.momentum = m.moco_momentum
        self.head = mlp([encoder.out_dim, m.proj_hidden_dim, m.proj_dim], cfg.model.norm, last_norm=False)
        self.key_encoder = copy.deepcopy(encoder)
        self.key_head = copy.deepcopy(self.head)
        for p in list(self.key_encoder.parameters()) + list(self.key_head.parameters()):
            p.requires_grad_(False)
        generator = torch.Generator().manual_seed(0)
        self.register_buffer("queue", F.normalize(torch.randn(m.moco_queue_size, m.proj_dim, generator=generator), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self._keys: list[torch.Tensor] | None = None
        self._pending: torch.Tensor | None = None

    def _query(self, view):
        return F.normalize(self.head(self.encoder(view)), dim=1)

    @torch.no_grad()
    def _key(self, view):
        return F.normalize(self.key_head(self.key_encoder(view)), dim=1)

    @torch.no_grad()
    def momentum_update(self):
        pairs = zip(
            list(self.encoder.parameters()) + list(self.head.parameters()),
            list(self.key_encoder.parameters()) + list(self.key_head.parameters()),
        )
        for q, k in pairs:
            k.mul_(self.momentum).add_(q.detach(), alpha=1 - self.momentum)

    def embed(self, view):
        return {"q": self._query(view), "k": self._key(view)}

    def embed_views(self, views, update_state):
        if update_state:
            self.end_step()  # a forgotten end_step() only delays the enqueue by one step
            self.momentum_update()
            self._keys = [self._key(v) for v in views]
            self._pending = self._keys[0]
        elif self._keys is None or len(self._keys) != len(views) or self._keys[0].shape[0] != views[0].shape[0]:
            raise RuntimeError("moco_v2: a pass with update_state=False must follow one with update_state=True on the same views")
        return [{"q": self._query(v), "k": k} for v, k in zip(views, self._keys)]

    def pair_loss(self, out_a, out_b, batch):
        tau = self.temperature_for(batch)
        queue = self.queue.clone().detach()
        return 0.5 * (info_nce(out_a["q"], out_b["k"], queue, tau) + info_nce(out_b["q"], out_a["k"], queue, tau))

    @torch.no_grad()
    def end_step(self):
        if self._pending is None:
            return
        keys = gather_no_grad(self._pending).to(self.queue.dtype)
        self._pending = None
        size = self.queue.shape[0]
        keys = keys[-size:]
        idx = (self.queue_ptr + torch.arange(keys.shape[0], device=keys.device)) % size
        self.queue[idx] = keys
        self.queue_ptr.copy_((self.queue_ptr + keys.shape[0]) % size)
