"""Messages with images through the lmwrap adapters' chat / stream_chat: LMDeployPipeline (in process),
AsyncLMDeployPipeline, LMDeployServer (a real api_server child) and LMDeployClient on it."""
import asyncio

import pytest

from image_server import image_server, png_bytes
from tiny_vl_models import build_tiny_llava, make_image

from lmwrap import AsyncLMDeployPipeline, LMDeployClient, LMDeployPipeline, LMDeployServer, ModelStatusCode
from lmwrap.client import image_url
from lmwrap.prompt import IMAGE_TOKEN, ImagePrompt, LMTemplateParser
from lmwrap_engine import GenerationConfig, pipeline

# The tiny LLaVA's own layout (see tiny_vl_models.LLAVA_TEMPLATE) as a meta template.
META = [dict(role='user', begin='USER: ', end=' '), dict(role='assistant', begin='ASSISTANT:', end='<|im_end|>',
                                                          generate=True)]
GREEDY = dict(max_new_tokens=8, top_k=1, temperature=0)
ENGINE = dict(dtype='float32', num_gpu_blocks=64, cache_block_seq_len=16)
IMAGES = [make_image(0), make_image(1, (80, 30))]


def dialog(*images):
    return [dict(role='user', content=[dict(type='text', text='describe')]
                 + [dict(type='image_url', image_url=dict(url=u)) for u in images])]


@pytest.fixture(scope='module')
def llava_dir(tiny_root):
    return build_tiny_llava(tiny_root)


@pytest.fixture(scope='module')
def images_url():
    with image_server({'a.png': png_bytes(IMAGES[0]), 'b.png': png_bytes(IMAGES[1])}) as base:
        yield base


@pytest.fixture(scope='module')
def expected(llava_dir):
    """The engine's greedy text for the same prompts (the engine matches transformers: test_vl_llava.py)."""
    gen = GenerationConfig(max_new_tokens=8, do_sample=False, skip_special_tokens=False)
    with pipeline(llava_dir, backend_config=dict_config()) as pipe:
        return [pipe((f'USER: {IMAGE_TOKEN}\ndescribe ASSISTANT:', [im]), gen_config=gen, do_preprocess=False).text
                for im in IMAGES] + [pipe((f'USER: {IMAGE_TOKEN}\n{IMAGE_TOKEN}\ndescribe ASSISTANT:', IMAGES),
                                          gen_config=gen, do_preprocess=False).text]


def dict_config():
    from tiny_models import tiny_config
    return tiny_config()


def test_template_parser_places_images():
    prompt = LMTemplateParser(META)(dialog('http://h/a.png', 'http://h/b.png'))
    assert isinstance(prompt, ImagePrompt) and prompt.images == ['http://h/a.png', 'http://h/b.png']
    assert prompt == f'USER: {IMAGE_TOKEN}\n{IMAGE_TOKEN}\ndescribe ASSISTANT:'
    assert type(LMTemplateParser(META)([dict(role='user', content='hi')])) is str
    from lmwrap_engine.vl import IMAGE_TOKEN as ENGINE_IMAGE_TOKEN
    assert IMAGE_TOKEN == ENGINE_IMAGE_TOKEN


def test_pipeline_adapter(llava_dir, images_url, expected):
    assert expected[0] != expected[1]  # the image really changes the answer
    with LMDeployPipeline(llava_dir, meta_template=META, pipeline_cfg=ENGINE, **GREEDY) as llm:
        assert llm.chat(dialog(image_url(IMAGES[0]))) == expected[0]
        assert llm.chat(dialog(images_url + '/b.png')) == expected[1]
        assert llm.chat([dialog(images_url + '/a.png'), dialog(images_url + '/b.png')]) == expected[:2]
        items = list(llm.stream_chat(dialog(images_url + '/a.png', images_url + '/b.png')))
        assert items[-1][0] == ModelStatusCode.END and items[-1][1] == expected[2]
        # PIL images in lmdeploy's image_data parts, in process
        pil = [dict(role='user', content=[dict(type='text', text='describe'),
                                          dict(type='image_data', image_data=dict(data=IMAGES[1]))])]
        assert llm.chat(pil) == expected[1]
        bad = list(llm.stream_chat(dialog(images_url + '/missing.png')))
        assert bad[-1][0] == ModelStatusCode.SESSION_INVALID_ARG


def test_async_pipeline_adapter(llava_dir, images_url, expected):
    async def run():
        with AsyncLMDeployPipeline(llava_dir, meta_template=META, pipeline_cfg=ENGINE, **GREEDY) as llm:
            text = await llm.chat(dialog(images_url + '/a.png'))
            items = [item async for item in llm.stream_chat(dialog(images_url + '/b.png'))]
            return text, items[-1][1]
    assert asyncio.run(run()) == (expected[0], expected[1])


def test_server_and_client_adapters(llava_dir, images_url, expected, tmp_path):
    path = tmp_path / 'b.png'
    path.write_bytes(png_bytes(IMAGES[1]))
    with LMDeployServer(path=llava_dir, meta_template=META, serve_cfg=ENGINE, **GREEDY) as server:
        assert server.chat(dialog(images_url + '/a.png')) == expected[0]
        assert server.chat(dialog(str(path))) == expected[1]  # a local path travels as a data URL
        client = LMDeployClient(server.url, meta_template=META, **GREEDY)
        assert client.chat(dialog(image_url(IMAGES[0]))) == expected[0]
        assert client.chat([dialog(images_url + '/a.png'), dialog(images_url + '/b.png')]) == expected[:2]
        items = list(client.stream_chat(dialog(images_url + '/a.png', images_url + '/b.png')))
        assert items[-1][0] == ModelStatusCode.END and items[-1][1] == expected[2]
        with pytest.raises(Exception, match='404'):
            client.chat(dialog(images_url + '/missing.png'))
        assert client.chat(dialog(images_url + '/a.png')) == expected[0]  # still serving
        client.close()
