"""Ghost clipping / book-keeping DP-SGD for LoRA: per-sample norms and clipped sums from activations and
output gradients, without per-sample gradients in memory (``privacy.clipping: ghost``)."""

from fedtune.privacy.ghost.clipper import GhostClipper, lora_linears
from fedtune.privacy.ghost.norms import choose_mode, clipped_weight_grad, per_sample_sq_norms
from fedtune.privacy.ghost.training import GhostDPOptimizer, GhostPrivateTraining, make_ghost_private

__all__ = ["GhostClipper", "GhostDPOptimizer", "GhostPrivateTraining", "choose_mode", "clipped_weight_grad",
           "lora_linears", "make_ghost_private", "per_sample_sq_norms"]
