"""Integrations of the fused ops with training frameworks (imported on demand: ``integrations.hf``)."""
