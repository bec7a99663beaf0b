"""Vision-language inputs: ``load_image``, prompt encoding of images, and lmdeploy's ``lmdeploy.vl`` names."""
from .image import ImageLoadError, load_image, load_image_from_url
from .items import IMAGE_TOKEN


def pipeline(*args, **kwargs):
    """``lmwrap_engine.pipeline`` (lmdeploy's older VL spelling, ``from lmdeploy.vl import pipeline``)."""
    from ..pipeline import pipeline as _pipeline
    return _pipeline(*args, **kwargs)


__all__ = ["IMAGE_TOKEN", "ImageLoadError", "load_image", "load_image_from_url", "pipeline"]
