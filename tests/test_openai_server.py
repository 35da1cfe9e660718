"""`lare serve` end to end: the tiny checkpoint behind transformers' OpenAI-compatible server on a loopback port,
answered over real HTTP (httpx) and checked against offline `generate`."""

from __future__ import annotations

import base64
import io
import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import chat, make_image

pytest.importorskip("fastapi", reason="needs the serving extra: pip install -e '.[serving]'")
httpx = pytest.importorskip("httpx", reason="needs the serving extra: pip install -e '.[serving]'")

pytestmark = pytest.mark.slow

HOST = "127.0.0.1"  # loopback only
NAME = "lare-tiny"
MAX_TOKENS = 6
# transformers 5.25 loads the model in a process of its own, which imports torch and transformers again: on a loaded
# 2-core machine that start takes minutes
STARTUP_TIMEOUT_S = 600


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    command = [sys.executable, "-m", "lare_hf.cli", "serve", tiny_checkpoint, "--host", HOST, "--port", str(port),
               "--device", "cpu", "--served-model-name", NAME, "--log-level", "warning"]  # fmt: skip
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"lare serve exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"lare serve did not answer /health in {STARTUP_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}"
                )
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def request(image, text: str, num_latent_steps: int | None = None, **extra) -> dict:
    content = [{"type": "image_url", "image_url": {"url": data_url(image)}}] if image is not None else []
    body = {"model": NAME, "messages": [{"role": "user", "content": content + [{"type": "text", "text": text}]}],
            "max_tokens": MAX_TOKENS, **extra}  # fmt: skip
    if num_latent_steps is not None:
        body["chat_template_kwargs"] = {"num_latent_steps": num_latent_steps}
    return body


def offline_answer(model, processor, image, text: str, num_latent_steps: int | None = None, **generate_kwargs) -> str:
    template_kwargs = {} if num_latent_steps is None else {"num_latent_steps": num_latent_steps}
    inputs = processor.apply_chat_template(
        chat(image, text), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
        **template_kwargs,
    )  # fmt: skip
    output = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False, **generate_kwargs)
    return processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def post(url: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)


def test_served_answers_equal_offline_generate(server, tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    models = httpx.get(f"{server}/v1/models", timeout=10).json()
    assert [entry["id"] for entry in models["data"]] == [NAME]

    cases = [  # image at the checkpoint's K, text only, image at K=2 and K=0 (a request's own K)
        (make_image(5), "Which digit?", None),
        (None, "Say something long about the weather.", None),
        (make_image(7), "which container is on the left?", 2),
        (make_image(9), "how many?", 0),
    ]
    expected = [offline_answer(model, processor, *case) for case in cases]
    assert len(set(expected)) > 1  # the cases can tell answers apart
    with ThreadPoolExecutor(max_workers=4) as pool:  # four concurrent requests
        responses = list(pool.map(lambda case: post(server, request(*case)), cases))
    for response, answer in zip(responses, expected):
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["choices"][0]["message"]["content"] == answer
        assert body["choices"][0]["finish_reason"] in ("length", "stop")
        assert body["usage"]["completion_tokens"] <= MAX_TOKENS

    # streaming: the deltas add up to the offline answer
    pieces, finish = [], None
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=request(*cases[0], stream=True), timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            assert "error" not in chunk, chunk
            choice = chunk["choices"][0]
            pieces.append(choice["delta"].get("content") or "")
            finish = choice.get("finish_reason") or finish
    assert "".join(pieces) == expected[0] and finish in ("length", "stop")

    # `stop` strings end the answer where generate(stop_strings=...) ends it
    stop = expected[0][len(expected[0]) // 2 :][:2]
    stopped = offline_answer(model, processor, *cases[0], stop_strings=[stop], tokenizer=processor.tokenizer)
    assert len(stopped) < len(expected[0])
    response = post(server, request(*cases[0], stop=[stop]))
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == stopped


def test_malformed_requests_get_a_400_and_the_server_keeps_serving(server, tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    good = request(make_image(5), "Which digit?")

    def with_image_url(url: str) -> dict:
        body = json.loads(json.dumps(good))
        body["messages"][0]["content"][0]["image_url"]["url"] = url
        return body

    not_an_image = "data:image/png;base64," + base64.b64encode(b"these bytes are no PNG").decode()
    cases = [
        (with_image_url("data:image/png;base64,@@not base64@@"), "invalid base64"),
        (with_image_url(not_an_image), "not an image"),
        (with_image_url("/etc/hostname"), "does not read local paths"),
        ({**good, "model": "someone/else"}, "pinned"),
        (request(make_image(5), "Which digit?", num_latent_steps=99), "num_latent_steps must be an integer"),
        ({**good, "messages": [{"role": "robot", "content": "hi"}]}, "role 'robot'"),
        ({"model": NAME, "max_tokens": MAX_TOKENS}, "needs `messages`"),
    ]
    for body, message in cases:
        response = post(server, body)
        assert 400 <= response.status_code < 500, (message, response.status_code, response.text)
        assert message in response.json()["detail"], response.text
    response = post(server, good)
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == offline_answer(
        model, processor, make_image(5), "Which digit?"
    )
