"""Nets behind one interface. Importing this package is light; the nets register themselves when the
net registry is first consulted (`registry.load_nets`), so cfg.py can read `models.modes` without torch."""
NET_MODULES = ("lite_medsam", "sam", "mobile_sam", "efficient_sam")  # each module registers its nets on import


def __getattr__(name: str):
    if name == "build_segmenter":
        from .registry import build_segmenter
        return build_segmenter
    raise AttributeError(f"module 'models' has no attribute {name}")


__all__ = ["NET_MODULES", "build_segmenter"]
