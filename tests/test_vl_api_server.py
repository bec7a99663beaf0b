"""Images through the api_server (a real process) with the official openai client: image_url as a data URL
and as an http URL served from 127.0.0.1, /v1/chat/interactive's image_url, and clear 400s."""
import base64

import pytest
import requests

from image_server import image_server, png_bytes
from serving import running_server, wait_blocks_free
from tiny_models import tiny_config
from tiny_vl_models import build_tiny_llava, make_image

from lmwrap_engine import GenerationConfig, pipeline

openai = pytest.importorskip("openai")
IMAGES = [make_image(0), make_image(1, (80, 30))]
N = 8


@pytest.fixture(scope="module")
def llava_dir(tiny_root):
    return build_tiny_llava(tiny_root)


@pytest.fixture(scope="module")
def images_url():
    with image_server({"a.png": png_bytes(IMAGES[0]), "b.png": png_bytes(IMAGES[1])}) as base:
        yield base


@pytest.fixture(scope="module")
def expected(llava_dir):
    """The pipeline's greedy replies (the engine matches transformers: test_vl_llava.py)."""
    gen = GenerationConfig(max_new_tokens=N, do_sample=False)
    with pipeline(llava_dir, backend_config=tiny_config()) as pipe:
        return {"a": pipe(("describe", IMAGES[0]), gen_config=gen).text,
                "ab": pipe(("compare", [IMAGES[0], IMAGES[1]]), gen_config=gen).text}


@pytest.fixture(scope="module")
def url(llava_dir):
    with running_server(llava_dir, "--dtype", "float32", "--num-gpu-blocks", "64",
                        "--cache-block-seq-len", "16") as (base, _):
        yield base


def data_url(image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def image_part(u: str) -> dict:
    return {"type": "image_url", "image_url": {"url": u}}


def test_openai_client_data_and_http_urls(url, images_url, llava_dir, expected):
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    r = client.chat.completions.create(model=llava_dir, max_tokens=N, temperature=0, messages=[
        {"role": "user", "content": [{"type": "text", "text": "describe"}, image_part(data_url(IMAGES[0]))]}])
    assert r.choices[0].message.content == expected["a"]
    r = client.chat.completions.create(model=llava_dir, max_tokens=N, temperature=0, messages=[
        {"role": "user", "content": [{"type": "text", "text": "compare"}, image_part(images_url + "/a.png"),
                                     image_part(images_url + "/b.png")]}])
    assert r.choices[0].message.content == expected["ab"]
    stream = client.chat.completions.create(model=llava_dir, max_tokens=N, temperature=0, stream=True, messages=[
        {"role": "user", "content": [{"type": "text", "text": "describe"}, image_part(images_url + "/a.png")]}])
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected["a"]
    assert wait_blocks_free(url)["lmwrap_kv_cache_blocks_used"] == 0


def test_interactive_image_url(url, images_url, expected):
    body = {"prompt": "describe", "image_url": images_url + "/a.png", "request_output_len": N, "top_k": 1,
            "session_id": 5}
    r = requests.post(url + "/v1/chat/interactive", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["text"] == expected["a"]


def test_bad_images_are_400_and_the_server_keeps_serving(url, images_url, llava_dir, expected):
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    for bad, words in ((images_url + "/missing.png", "HTTP 404"), ("data:image/png;base64,AAAA", "not a readable"),
                       ("ftp://x/y.png", "http\(s\) or data: URL"), ("/etc/hosts.png", "http\(s\) or data: URL")):
        with pytest.raises(openai.BadRequestError, match=words):
            client.chat.completions.create(model=llava_dir, max_tokens=N, messages=[
                {"role": "user", "content": [{"type": "text", "text": "describe"}, image_part(bad)]}])
    with pytest.raises(openai.BadRequestError, match="url"):
        client.chat.completions.create(model=llava_dir, max_tokens=N, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])
    r = client.chat.completions.create(model=llava_dir, max_tokens=N, temperature=0, messages=[
        {"role": "user", "content": [{"type": "text", "text": "describe"}, image_part(data_url(IMAGES[0]))]}])
    assert r.choices[0].message.content == expected["a"]
    assert wait_blocks_free(url)["lmwrap_kv_cache_blocks_used"] == 0


def test_text_only_model_refuses_images(model_dir):
    with running_server(model_dir, "--dtype", "float32", "--num-gpu-blocks", "16") as (base, _):
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="text-only model"):
            client.chat.completions.create(model=model_dir, max_tokens=4, messages=[
                {"role": "user", "content": [{"type": "text", "text": "hi"}, image_part(data_url(IMAGES[0]))]}])
        r = client.chat.completions.create(model=model_dir, max_tokens=4, messages=[
            {"role": "user", "content": [{"type": "text", "text": "hi"}]}])
        assert r.choices[0].finish_reason in ("stop", "length")
