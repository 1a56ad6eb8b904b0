"""dino_hier: DINOv2 for white blood cells with hierarchical cross-entropy."""

__version__ = "0.1.0"
