"""Stage kinds by name. The contract every kind implements is `base.StageKind`; adding a kind
is one module and one line here."""

from __future__ import annotations

from .base import StageContext, StageKind
from .distill import Distill
from .llamacpp import LlamaCppQuantize
from .prune import Prune
from .qat import QAT
from .quantize import Quantize
from .recover import Recover

STAGES: dict[str, StageKind] = {
    "distill": Distill(),
    "prune": Prune(),
    "recover": Recover(),
    "quantize": Quantize(),
    "qat": QAT(),
    "llamacpp": LlamaCppQuantize(),
}

__all__ = ["STAGES", "StageContext", "StageKind"]
