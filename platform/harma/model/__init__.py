"""The HarMA model: backbone, adapters, losses and adapter checkpoints (no Ray here)."""

from harma.model.harma import HarmaModel, build_model, parameter_summary

__all__ = ["HarmaModel", "build_model", "parameter_summary"]
