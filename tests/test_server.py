"""OpenAI-compatible server on 127.0.0.1 over a tiny random-weight engine (loopback only).

The load test (1,000 requests, 64 concurrent clients, mixed lengths, some invalid, some
cancelled midway) checks that every request is answered or cleanly rejected, that no KV page
leaks and that nothing compiles after warm-up.
"""

import concurrent.futures as cf
import http.client
import json
import random
import socket
import time

import jax
import pytest

from comet_jax.engine.config import EngineConfig
from comet_jax.engine.engine import LLMEngine, count_backend_compiles
from comet_jax.engine.runner import ByteTokenizer, preset_config
from comet_jax.serving.server import serve
from models.llama import LlamaForCausalLM, init_params

MODEL = "tiny-random"
CTX = 256


@pytest.fixture(scope="module")
def server():
    cfg = preset_config("tiny")
    params = init_params(LlamaForCausalLM(cfg), jax.random.key(0))
    ec = EngineConfig(
        max_batch=16,
        max_tokens_per_step=64,
        max_prefill_seqs=4,
        max_model_len=CTX,
        page_size=16,
        num_pages=96,
        decode_buckets=(16,),
        prefill_batch_buckets=(4,),
        chunk_buckets=(64,),
        compute_dtype="float32",
        kernels="reference",
    )
    engine = LLMEngine.build(cfg, params, ec, tokenizer=ByteTokenizer(), progress=False)
    httpd, app = serve(
        engine, ByteTokenizer(), MODEL, host="127.0.0.1", port=0, block=False, max_waiting=512
    )
    yield httpd.server_address[1], app
    httpd.shutdown()
    httpd.server_close()
    app.loop.stop()


def request(port, method, path, body=None, raw=None, timeout=60):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    data = raw if raw is not None else (None if body is None else json.dumps(body))
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    ctype = resp.getheader("Content-Type", "")
    return resp.status, json.loads(payload) if "json" in ctype else payload.decode()


def sse_events(port, path, body, timeout=60):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"
    events = []
    for line in resp:
        line = line.decode().strip()
        if line.startswith("data: "):
            events.append(line[6:])
            if events[-1] == "[DONE]":
                break
    conn.close()
    return events


def wait_idle(app, timeout=60):
    deadline = time.monotonic() + timeout
    while app.engine.has_unfinished():
        assert time.monotonic() < deadline, "engine did not drain"
        time.sleep(0.05)


def test_health_models_metrics(server):
    port, app = server
    assert request(port, "GET", "/health") == (200, {"status": "ok"})
    status, models = request(port, "GET", "/v1/models")
    assert status == 200 and models["data"][0]["id"] == MODEL
    status, text = request(port, "GET", "/metrics")
    assert status == 200
    for name in (
        "comet_running_requests",
        "comet_waiting_requests",
        "comet_kv_pages_used",
        "comet_generation_tokens_per_second",
        "comet_generated_tokens_total",
    ):
        assert f"\n{name} " in "\n" + text


def test_completion_and_chat(server):
    port, _ = server
    status, out = request(
        port,
        "POST",
        "/v1/completions",
        {
            "model": MODEL,
            "prompt": "Hello there",
            "max_tokens": 7,
            "temperature": 0,
            "ignore_eos": True,
        },
    )
    assert status == 200, out
    assert out["object"] == "text_completion"
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["usage"] == {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
    # Greedy streaming yields the same text as the blocking call.
    events = sse_events(
        port,
        "/v1/completions",
        {
            "prompt": "Hello there",
            "max_tokens": 7,
            "temperature": 0,
            "stream": True,
            "ignore_eos": True,
        },
    )
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == out["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    status, out = request(
        port,
        "POST",
        "/v1/chat/completions",
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4,
            "seed": 3,
        },
    )
    assert status == 200 and out["object"] == "chat.completion"
    assert out["choices"][0]["message"]["role"] == "assistant"
    events = sse_events(
        port,
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True},
    )
    first = json.loads(events[0])
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"]["role"] == "assistant"
    # Token-id prompts work too.
    status, out = request(port, "POST", "/v1/completions", {"prompt": [72, 105], "max_tokens": 2})
    assert status == 200


@pytest.mark.parametrize(
    "path, body, raw, status, needle",
    [
        ("/v1/completions", None, "{not json", 400, "JSON"),
        ("/v1/completions", None, "[1, 2]", 400, "JSON object"),
        ("/v1/completions", {"model": "gpt-9", "prompt": "x"}, None, 404, "does not exist"),
        ("/v1/completions", {"prompt": "x" * CTX, "max_tokens": 1}, None, 400, "context"),
        ("/v1/completions", {"prompt": "x", "max_tokens": -5}, None, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "temperature": "hot"}, None, 400, "temperature"),
        ("/v1/completions", {"prompt": "x", "top_p": 0}, None, 400, "top_p"),
        ("/v1/completions", {"prompt": 3}, None, 400, "prompt"),
        ("/v1/completions", {"prompt": [1, 999]}, None, 400, "token ids"),
        ("/v1/completions", {"prompt": "x", "n": 2}, None, 400, "n"),
        ("/v1/completions", {"prompt": "x", "stream": "yes"}, None, 400, "stream"),
        ("/v1/chat/completions", {"messages": "hi"}, None, 400, "messages"),
        ("/v1/embeddings", {"input": "x"}, None, 404, "no route"),
    ],
)
def test_invalid_requests_get_4xx_and_server_keeps_serving(server, path, body, raw, status, needle):
    port, app = server
    got, out = request(port, "POST", path, body=body, raw=raw)
    assert got == status, out
    assert needle in out["error"]["message"]
    assert request(port, "POST", "/v1/completions", {"prompt": "ok", "max_tokens": 1})[0] == 200


def test_client_disconnect_aborts_and_frees_pages(server):
    port, app = server
    aborted = app.engine.stats.requests_aborted
    sock = socket.create_connection(("127.0.0.1", port))
    body = json.dumps(
        {
            "prompt": "x" * 100,
            "max_tokens": 120,
            "stream": True,
            "ignore_eos": True,
            "temperature": 0,
        }
    )
    sock.sendall(
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
        f"Content-Type: application/json\r\n\r\n{body}".encode()
    )
    assert b"200" in sock.recv(4096)
    sock.close()
    deadline = time.monotonic() + 30
    while app.engine.stats.requests_aborted == aborted:
        assert time.monotonic() < deadline, "disconnect did not abort the request"
        time.sleep(0.05)
    wait_idle(app)
    assert app.engine.allocator.num_used == 0


def _client(port, i, rng):
    """One load-test request; returns its outcome label."""
    kind = rng.random()
    max_tokens = rng.randint(1, 24)
    prompt = "".join(rng.choice("abcdefgh ") for _ in range(rng.randint(1, 180)))
    if kind < 0.05:
        status, out = request(port, "POST", "/v1/completions", raw="{oops")
        assert status == 400 and "error" in out
        return "rejected"
    if kind < 0.10:
        status, out = request(port, "POST", "/v1/completions", {"prompt": prompt, "max_tokens": -1})
        assert status == 400 and "max_tokens" in out["error"]["message"]
        return "rejected"
    stream = kind < 0.55
    body = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "stream": stream,
        "temperature": rng.choice([0.0, 0.8]),
        "seed": i,
        "ignore_eos": True,
    }
    if kind > 0.92:  # cancelled midway: hang up after the response starts or a short wait
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        data = json.dumps(dict(body, stream=True, max_tokens=200 - len(prompt) // 4 + 40))
        sock.sendall(
            f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: "
            f"{len(data)}\r\n\r\n{data}".encode()
        )
        sock.settimeout(rng.choice([0.01, 0.2, 30]))
        try:
            sock.recv(64)
        except TimeoutError:
            pass
        sock.close()
        return "cancelled"
    if stream:
        events = sse_events(port, "/v1/completions", body)
        assert events[-1] == "[DONE]"
        last = json.loads(events[-2])
        assert last["choices"][0]["finish_reason"] == "length"
        return "streamed"
    status, out = request(port, "POST", "/v1/completions", body)
    if status == 503:
        return "busy"
    assert status == 200, out
    assert out["usage"]["completion_tokens"] == max_tokens
    return "completed"


@pytest.mark.slow
def test_load_1000_requests_64_clients(server):
    port, app = server
    # Warm-up is over (the fixture compiled every bucket); count compilations from here.
    compiles = count_backend_compiles()
    compiled_before = app.engine.runner.num_compilations
    rng = random.Random(0)
    seeds = [rng.random() for _ in range(1000)]
    with cf.ThreadPoolExecutor(64) as pool:
        futures = [pool.submit(_client, port, i, random.Random(s)) for i, s in enumerate(seeds)]
        outcomes = [f.result(timeout=300) for f in futures]
    counts = {k: outcomes.count(k) for k in set(outcomes)}
    assert sum(counts.values()) == 1000
    assert counts.get("completed", 0) + counts.get("streamed", 0) > 700, counts
    assert counts.get("cancelled", 0) > 30, counts
    wait_idle(app)
    engine = app.engine
    assert engine.allocator.num_used == 0, "KV pages leaked"
    assert not engine.scheduler.running and not engine.scheduler.waiting
    assert not engine._requests, "request state leaked"
    assert compiles() == 0 and engine.runner.num_compilations == compiled_before
    assert app.loop.errors == 0
