"""Preference losses computed from per-sequence log-probs (``preference_loss``) or straight from hidden
states through the fused op (``logo_loss``, ``LogoLoss``)."""
from .logo import LogoLoss, LogoLossOutput, logo_loss
from .preference import LOSS_TYPES, PreferenceLossOutput, preference_loss

__all__ = ["LogoLoss", "LogoLossOutput", "logo_loss", "LOSS_TYPES", "PreferenceLossOutput", "preference_loss"]
