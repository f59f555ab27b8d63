"""The offline benchmark: a synthetic TOFU/WMDP-style world and tiny target models trained on it."""

from nsru.bench.world import World, WorldConfig, format_mc, make_world

__all__ = ["World", "WorldConfig", "format_mc", "make_world"]
