"""load_image: a PIL image, a local HTTP server on 127.0.0.1, a data URL, a path; each failure is a clear error."""
import base64

import numpy as np
import pytest

from image_server import image_server, png_bytes
from tiny_vl_models import make_image

from lmwrap_engine.vl import ImageLoadError, load_image, load_image_from_url


@pytest.fixture(scope="module")
def image():
    return make_image(7, (20, 12))


@pytest.fixture(scope="module")
def url(image):
    files = {"im.png": png_bytes(image), "text.png": b"this is not an image",
             "big.png": png_bytes(make_image(8, (400, 400)))}
    with image_server(files) as base:
        yield base


def same(a, b) -> bool:
    return a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))


def test_pil_passthrough_and_rgb(image):
    assert load_image(image) is image
    rgba = image.convert("RGBA")
    out = load_image(rgba)
    assert out.mode == "RGB" and same(out, image)


def test_http_data_url_and_path(image, url, tmp_path):
    assert same(load_image(url + "/im.png"), image)
    assert same(load_image_from_url(url + "/im.png"), image)
    data = "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()
    assert same(load_image(data), image)
    path = tmp_path / "im.png"
    path.write_bytes(png_bytes(image.convert("L")))
    for source in (str(path), path, "file://" + str(path)):
        out = load_image(source)
        assert out.mode == "RGB" and out.size == image.size


def test_failures_name_their_source(url, tmp_path):
    with pytest.raises(ImageLoadError, match=r"/missing\.png.*HTTP 404"):
        load_image(url + "/missing.png")
    with pytest.raises(ImageLoadError, match=r"/slow/im\.png.*(timed out|took more than)"):
        load_image(url + "/slow/im.png", timeout=0.5)
    with pytest.raises(ImageLoadError, match=r"/text\.png.*not a readable image"):
        load_image(url + "/text.png")
    with pytest.raises(ImageLoadError, match=r"/big\.png.*byte limit"):
        load_image(url + "/big.png", max_bytes=10_000)
    with pytest.raises(ImageLoadError, match="127.0.0.1:1/x.png"):
        load_image("http://127.0.0.1:1/x.png", timeout=2)  # connection refused
    with pytest.raises(ImageLoadError, match="data:"):
        load_image("data:image/png;base64," + base64.b64encode(b"garbage").decode())
    with pytest.raises(ImageLoadError, match="base64"):
        load_image("data:image/png,plain")
    with pytest.raises(ImageLoadError, match="no-such.png"):
        load_image(str(tmp_path / "no-such.png"))
    with pytest.raises(ImageLoadError, match="int"):
        load_image(3)
    assert issubclass(ImageLoadError, ValueError)
