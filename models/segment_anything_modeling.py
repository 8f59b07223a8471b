"""segment-anything's modeling classes, imported without running the package's `__init__` first.

That `__init__` imports segment-anything's predictor and mask generator, which import torchvision, and
torchvision imports torch's compiler stack (torch._dynamo with sympy and triton): about 170 MB of resident
memory and 1.5 s of start-up on the 2-core CPU, used by no model here. So when `segment_anything` is not
imported yet, its package module is made without running `__init__`, and it runs `__init__` itself the first
time it is asked for a name it lacks (`from segment_anything import sam_model_registry`, say): other code
still sees the whole package, with the same classes."""
from __future__ import annotations

import importlib.util
import sys


def defer_package_init(name: str) -> None:
    """Put package `name` in sys.modules with its `__init__` not yet run (its submodules import as usual);
    the first lookup of a name the module lacks runs `__init__`, then answers. Nothing if already imported."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise ModuleNotFoundError(f"No module named {name!r}: install the pinned stack (make install)", name=name)
    package = importlib.util.module_from_spec(spec)

    def complete(attribute: str):
        del package.__getattr__
        spec.loader.exec_module(package)
        return getattr(package, attribute)

    package.__getattr__ = complete  # a module's __getattr__ answers only names it lacks (PEP 562)
    sys.modules[name] = package


defer_package_init("segment_anything")

from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer  # noqa: E402
from segment_anything.modeling.common import LayerNorm2d, MLPBlock  # noqa: E402
from segment_anything.modeling.image_encoder import Attention, Block, PatchEmbed, get_rel_pos  # noqa: E402
from segment_anything.modeling.transformer import TwoWayAttentionBlock  # noqa: E402

__all__ = ["Attention", "Block", "ImageEncoderViT", "LayerNorm2d", "MLPBlock", "MaskDecoder", "PatchEmbed",
           "PromptEncoder", "TwoWayAttentionBlock", "TwoWayTransformer", "get_rel_pos", "defer_package_init"]
