"""Dynamic Linear Attention as registered torch.library custom ops (namespace ``dla``)."""
from .api import dla_attention, dla_decode_step
from .cache import DLACache, DLASchedule
from .reference import dla_reference

__all__ = ["DLACache", "DLASchedule", "dla_attention", "dla_decode_step", "dla_reference"]
