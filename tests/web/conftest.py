"""Browser fixtures: Debian's headless Chromium through chromedriver (Selenium), and a chat server.

The server is the real app on loopback: a tiny randomly initialised model in the batching
engine, every tool available (BM25 index, calculator, solver, a loopback AUTOMATIC1111-style
image server), preference tags, and the scripted first tool pass of tests/inference/server_utils.py
(a random model never writes a command by itself; everything after the command is real).
"""

import shutil
from pathlib import Path

import pytest

from data_pipelines import specials as sp
from moss_jax.inference.decoder import Decoder
from moss_jax.inference.engine import BatchEngine
from moss_jax.inference.server_app import create_app
from moss_jax.inference.tags import PreferenceTags
from moss_jax.tools import ToolsConfig
from tests.inference.conftest import chat_model, sp_model_path, tokenizer  # noqa: F401 -- shared fixtures
from tests.inference.server_utils import ScriptedFirstPass, build_search_index, fake_txt2img_server, png_bytes, serve

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "web"


@pytest.fixture(scope="session")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for path in (CHROMIUM, CHROMEDRIVER):
        if shutil.which(path) is None:
            pytest.fail(
                f"{path} not found: the web tests need Debian's chromium and chromium-driver (scripts/test.sh "
                "installs them; or: apt-get install -y --no-install-recommends chromium chromium-driver)"
            )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # Narrow window: the page must be usable at phone width.
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=420,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def chat_server(chat_model, tokenizer, tmp_path_factory):  # noqa: F811
    """(url of a full server, url of one that refuses every request as overloaded, engine, generation log)."""
    config, params = chat_model
    decoder = Decoder(config.replace(max_len=1024), batch_size=4, cache_len=2048, chunk_size=4)
    engine = BatchEngine(decoder, params, tokenizer.decode).start()
    root = tmp_path_factory.mktemp("web")
    log = []
    with fake_txt2img_server(png_bytes()) as sd_url:
        tools = ToolsConfig(
            enable_search=True,
            search_index_dir=build_search_index(root),
            enable_text2image=True,
            txt2img_url=sd_url,
            image_dir=str(root / "images"),
        )
        tags = PreferenceTags(sp.QUALITY_TAGS[:3], sp.QUALITY_TAGS[2])
        app = create_app(
            engine,
            tokenizer,
            1024,
            "moss-test",
            default_max_tokens=16,
            tools_config=tools,
            preference_tags=tags,
            make_generator=lambda: ScriptedFirstPass(engine, tokenizer, log),
        )
        busy = create_app(engine, tokenizer, 1024, "moss-busy", max_pending=0)
        with serve(app) as url, serve(busy) as busy_url:
            yield url, busy_url, engine, log
    engine.shutdown()
