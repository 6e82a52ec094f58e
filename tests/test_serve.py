"""`mmdomain serve`: a real uvicorn on 127.0.0.1 answers OpenAI chat completions (whole and streamed) to a plain HTTP
client and to the official openai client, refuses what its limits forbid with OpenAI-style errors naming the limit,
and queues concurrent requests instead of failing them."""
from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn) is not installed: pip install 'mmdomain[serve]'")
uvicorn = pytest.importorskip("uvicorn", reason="the serve extra (fastapi, uvicorn) is not installed: pip install 'mmdomain[serve]'")
httpx = pytest.importorskip("httpx")

from mmdomain.builder import build_model  # noqa: E402
from mmdomain.generation import GenerationOptions, generate_batch  # noqa: E402
from mmdomain.serve_app import ServeLimits, create_app  # noqa: E402
from mmdomain.serve_media import MediaPolicy  # noqa: E402
from mmdomain.spec import ModelSpec  # noqa: E402

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def png(size: int = 32, value: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def ask(url: str, text: str = "where is the lesion ?", **extra) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                                      {"type": "text", "text": text}]}], **extra}


@pytest.fixture(scope="module")
def server(tiny_llm_dir, tmp_path_factory):
    torch.manual_seed(0)
    spec = ModelSpec.model_validate({"encoder": {"name": "tiny-vit", "options": {"image_size": 32, "channels": 1}}, "llm": {"path": tiny_llm_dir}})
    model, processor = build_model(spec)
    model.eval()
    allowed = tmp_path_factory.mktemp("allowed")
    (allowed / "scan.png").write_bytes(png(value=40))
    outside = tmp_path_factory.mktemp("outside")
    (outside / "scan.png").write_bytes(png(value=40))
    limits = ServeLimits(max_body_bytes=100_000, max_tokens=16, default_max_tokens=6,
                         media=MediaPolicy(max_items=2, max_pixels=64 * 64, max_bytes=100_000, allow_from=(allowed.as_uri() + "/",)))
    app = create_app(model, processor, device=torch.device("cpu"), model_name="tiny", limits=limits, api_key=KEY)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(200):  # bounded: at most ~20 s
        if uv.started:
            break
        time.sleep(0.1)
    assert uv.started, "uvicorn did not start"
    try:
        yield {"base": f"http://127.0.0.1:{port}", "model": model, "processor": processor, "allowed": allowed, "outside": outside}
    finally:
        uv.should_exit = True
        thread.join(timeout=20)
        sock.close()
        assert not thread.is_alive()


def post(server, body, headers=AUTH, **kw):
    return httpx.post(server["base"] + "/v1/chat/completions", json=body, headers=headers, timeout=120, **kw)


def expected_answer(server, value: int = 0, **options) -> str:
    proc = server["processor"]
    sample = proc([{"role": "user", "content": "<image> where is the lesion ?"}], [np.full((32, 32), value, np.uint8)], key="k",
                  add_generation_prompt=True)
    options = {"max_new_tokens": 6, **options}
    return generate_batch(server["model"], proc, [sample], GenerationOptions(**options), torch.device("cpu"))[0].text


def sse_events(response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            events.append(line[6:] if line[6:] == "[DONE]" else json.loads(line[6:]))
    return events


def test_models_and_a_chat_completion(server):
    listed = httpx.get(server["base"] + "/v1/models", headers=AUTH, timeout=30).json()
    assert [m["id"] for m in listed["data"]] == ["tiny"] and listed["object"] == "list"
    response = post(server, ask(data_url(png())))
    assert response.status_code == 200, response.text
    body = response.json()
    choice = body["choices"][0]
    assert body["object"] == "chat.completion" and choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == expected_answer(server) and choice["finish_reason"] in ("stop", "length")
    assert expected_answer(server)  # the tiny random LLM says something, so the comparisons below mean something
    assert body["usage"]["prompt_tokens"] > 0 and body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]


def test_a_streamed_completion_sends_the_same_text_in_chunks(server):
    with httpx.stream("POST", server["base"] + "/v1/chat/completions", json=ask(data_url(png()), stream=True,
                      stream_options={"include_usage": True}), headers=AUTH, timeout=120) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]" and events[0]["choices"][0]["delta"]["role"] == "assistant"
    chunks = [e for e in events[:-1] if e["choices"]]
    assert all(e["object"] == "chat.completion.chunk" and e["id"] == events[0]["id"] for e in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length") and events[-2]["usage"]["completion_tokens"] >= 1
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in chunks) == expected_answer(server)


@pytest.mark.parametrize("case", ["remote-url", "file-url-outside", "oversize-body", "too-many-images", "huge-max-tokens", "huge-image",
                                  "wrong-key", "no-key", "unknown-model", "broken-image"])
def test_refusals_are_openai_errors_naming_the_limit(server, case):
    image = data_url(png())
    body, headers = ask(image), AUTH
    if case == "remote-url":
        body = ask("https://example.org/scan.png")
    elif case == "file-url-outside":
        body = ask((server["outside"] / "scan.png").as_uri())
    elif case == "oversize-body":
        body = ask(image, padding="x" * 150_000)
    elif case == "too-many-images":
        body["messages"][0]["content"] = [{"type": "image_url", "image_url": {"url": image}}] * 3
    elif case == "huge-max-tokens":
        body["max_tokens"] = 10_000
    elif case == "huge-image":
        body = ask(data_url(png(size=100)))
    elif case == "wrong-key":
        headers = {"Authorization": "Bearer nope"}
    elif case == "no-key":
        headers = {}
    elif case == "unknown-model":
        body["model"] = "gpt-4o"
    elif case == "broken-image":
        body = ask(data_url(b"not a png at all"))
    status, code, words = {
        "remote-url": (400, "url_not_allowed", "--allow-media-from"), "file-url-outside": (400, "url_not_allowed", "--allow-media-from"),
        "oversize-body": (413, "body_too_large", "--max-body-bytes"), "too-many-images": (400, "too_many_media_items", "--max-media-items"),
        "huge-max-tokens": (400, "max_tokens_too_large", "--max-tokens-limit"), "huge-image": (400, "image_too_large", "--max-pixels"),
        "wrong-key": (401, "invalid_api_key", "API key"), "no-key": (401, "invalid_api_key", "API key"),
        "unknown-model": (404, "model_not_found", "'tiny'"), "broken-image": (400, "invalid_request", "cannot be used"),
    }[case]
    response = post(server, body, headers=headers)
    error = response.json()["error"]
    assert response.status_code == status and error["code"] == code and words in error["message"], response.text
    assert set(error) == {"message", "type", "param", "code"}


def test_a_file_url_under_the_allow_list_is_read(server):
    response = post(server, ask((server["allowed"] / "scan.png").as_uri()))
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == expected_answer(server, value=40)
    climbing = server["allowed"].as_uri() + "/../" + server["outside"].name + "/scan.png"
    assert post(server, ask(climbing)).json()["error"]["code"] == "url_not_allowed"


def test_concurrent_requests_wait_their_turn(server):
    """Two sampled requests at once, each with its own seed: both answered, each exactly as alone (a seed is applied
    to its own request only, so the second never ran inside the first's random stream)."""
    seeds = (1, 2)
    bodies = [ask(data_url(png()), max_tokens=8, temperature=8.0, seed=seed) for seed in seeds]
    with ThreadPoolExecutor(2) as pool:
        responses = list(pool.map(lambda b: post(server, b), bodies))
    assert [r.status_code for r in responses] == [200, 200], [r.text for r in responses]
    answers = [r.json()["choices"][0]["message"]["content"] for r in responses]
    alone = [expected_answer(server, max_new_tokens=8, do_sample=True, temperature=8.0, seed=seed) for seed in seeds]
    assert answers == alone and answers[0] != answers[1]


def test_the_official_openai_client_talks_to_it(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server["base"] + "/v1", api_key=KEY, max_retries=0, timeout=120)
    assert [m.id for m in client.models.list()] == ["tiny"]
    messages = ask(data_url(png()))["messages"]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6)
    assert whole.choices[0].message.content == expected_answer(server) and whole.usage.completion_tokens >= 1
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == whole.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="--max-tokens-limit"):
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=999)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server["base"] + "/v1", api_key="wrong", max_retries=0).models.list()


def test_a_client_that_hangs_up_mid_stream_frees_the_model(server):
    with httpx.stream("POST", server["base"] + "/v1/chat/completions", json=ask(data_url(png()), stream=True, max_tokens=16),
                      headers=AUTH, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                break  # hang up after the first event
    response = post(server, ask(data_url(png())))  # the lock was released: this one is answered, not left waiting
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == expected_answer(server)


def test_a_full_queue_refuses_with_503():
    import asyncio

    from mmdomain.serve_app import _Queue
    from mmdomain.serve_media import RequestRefused

    async def scenario():
        queue = _Queue(max_waiting=1)
        await queue.__aenter__()  # one running
        waiter = asyncio.ensure_future(queue.__aenter__())  # one waiting
        await asyncio.sleep(0)
        with pytest.raises(RequestRefused) as refused:
            await queue.__aenter__()
        assert refused.value.status == 503 and "--max-waiting" in str(refused.value)
        await queue.__aexit__(None, None, None)
        await asyncio.wait_for(waiter, 5)  # the waiting one gets the model next
        await queue.__aexit__(None, None, None)

    asyncio.run(scenario())


def test_audio_parts_go_to_the_audio_kind_and_images_to_the_image_kind():
    from types import SimpleNamespace

    from mmdomain.serve_media import MediaPolicy, RequestRefused, parse_messages

    kinds = [SimpleNamespace(name="media", aliases=("image", "vision"), token="<image>"),
             SimpleNamespace(name="audio", aliases=(), token="<audio>")]
    wav = base64.b64encode(b"RIFF....WAVE").decode()
    chat = parse_messages([{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}},
        {"type": "image_url", "image_url": {"url": data_url(png())}}, {"type": "text", "text": "what is heard and seen ?"}]}],
        SimpleNamespace(kinds=kinds), MediaPolicy())
    assert chat.conversation == [{"role": "user", "content": "<audio> <image> what is heard and seen ?"}]
    assert [name for name, _ in chat.files] == ["item.wav", "item.png"] and chat.files[0][1] == b"RIFF....WAVE"
    audio_only = SimpleNamespace(kinds=[SimpleNamespace(name="media", aliases=("image", "audio"), token="<audio>")])
    with pytest.raises(RequestRefused, match="takes no image"):
        parse_messages([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png())}}]}], audio_only, MediaPolicy())


@pytest.mark.slow  # a second Python process loading torch and the model: ~10 s on a quiet machine
def test_the_serve_command_binds_loopback_and_says_when_the_extra_is_missing(server, tmp_path, monkeypatch, capsys):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from mmdomain.builder import save_pretrained
    from mmdomain.cli import main

    save_pretrained(server["model"], server["processor"], tmp_path / "ckpt")
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if the extra were not installed
    assert main(["-q", "serve", str(tmp_path / "ckpt")]) == 2
    assert "pip install 'mmdomain[serve]'" in capsys.readouterr().err
    monkeypatch.undo()

    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "MMDOMAIN_API_KEY": "from-env"}
    process = subprocess.Popen([sys.executable, "-m", "mmdomain.cli", "serve", str(tmp_path / "ckpt"), "--port", str(port),
                                "--device", "cpu", "--model-name", "ckpt-model"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        listed = None
        for _ in range(240):  # bounded: at most ~60 s for torch and the model to load
            try:
                listed = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": "Bearer from-env"}, timeout=5)
                break
            except httpx.TransportError:
                assert process.poll() is None, process.stdout.read().decode()
                time.sleep(0.25)
        assert listed is not None and listed.json()["data"][0]["id"] == "ckpt-model"
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).status_code == 401  # the key from the environment holds
    finally:
        process.terminate()
        process.wait(timeout=30)
