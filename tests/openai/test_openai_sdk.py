"""The official `openai` Python package against `dsv2 up` (router + 2 expert shards on the tiny
model, loopback): completions and chat completions, streamed and not; greedy streamed text
equals non-streamed text; `usage` equals the prompt's token count from Tokenize (through
`dsv2 generate --endpoint --json`); stop strings and max_tokens are honoured; a bad request is a
BadRequestError whose message and `param` name the field.

Run by scripts/openai-check.sh (CI: scripts/test.sh) with the venv of scripts/install-ci-tools.sh;
the binaries come from $DSV2_BIN_DIR, else target/debug.
"""

import json
import os
import queue
import signal
import subprocess
import tempfile
import threading
from pathlib import Path

import openai
import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN_DIR = Path(os.environ.get("DSV2_BIN_DIR", ROOT / "target" / "debug"))
DSV2 = BIN_DIR / "dsv2"
PROMPT = "The router receives a request"
# What the default (trained) tiny model's chat template makes of [user: Hello] after its BOS:
# each message is a line of text the model continues
# (services/core/assets/tiny-trained/tokenizer_config.json).
CHAT_PROMPT_TEXT = "Hello\n"


@pytest.fixture(scope="module")
def cluster():
    """`dsv2 up` on free ports; yields (gRPC endpoint, HTTP base URL); Ctrl-C at the end."""
    assert DSV2.exists(), f"{DSV2} not found: cargo build --workspace --bins first"
    cache = tempfile.TemporaryDirectory()
    env = dict(os.environ, DSV2_CACHE_DIR=cache.name)
    up = subprocess.Popen(
        [str(DSV2), "up", "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--child-log-level", "warn"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    lines = queue.Queue()
    log = []

    def drain(stream, tag):
        for line in stream:
            log.append(line)
            lines.put((tag, line))

    for stream, tag in [(up.stdout, "out"), (up.stderr, "err")]:
        threading.Thread(target=drain, args=(stream, tag), daemon=True).start()
    grpc, http = None, None
    try:
        while grpc is None or http is None:
            tag, line = lines.get(timeout=180)
            if tag == "out" and grpc is None:
                grpc = line.strip()
            if tag == "err" and "/v1 (HTTP" in line:
                http = line[line.rindex("http://", 0, line.index("/v1 (HTTP")) : line.index(" (HTTP")]
    except queue.Empty:
        up.kill()
        pytest.fail("dsv2 up did not come up within 180 s:\n" + "".join(log))
    yield grpc, http
    up.send_signal(signal.SIGINT)
    try:
        up.wait(timeout=30)
    except subprocess.TimeoutExpired:
        up.kill()
    cache.cleanup()


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=cluster[1], api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(client):
    models = client.models.list().data
    assert len(models) == 1
    return models[0].id


def tokenize_count(grpc, text):
    """Prompt tokens of `text` (BOS included) as the router's Tokenize counts them."""
    out = subprocess.run(
        [str(DSV2), "generate", "--endpoint", grpc, "--input-text", text, "--max-output-len", "1", "--json"],
        check=True,
        capture_output=True,
        text=True,
    )
    v = json.loads(out.stdout)
    assert v["prompt_tokens"] == len(v["input_ids"])
    return v["prompt_tokens"]


def test_completions_streamed_equals_whole_and_usage_equals_tokenize(client, model, cluster):
    args = dict(model=model, prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    whole = client.completions.create(**args)
    choice = whole.choices[0]
    assert choice.finish_reason == "length"
    assert whole.usage.completion_tokens == 12, "max_tokens honoured"
    assert whole.usage.prompt_tokens == tokenize_count(cluster[0], PROMPT)
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 12
    chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == 12


def test_chat_streamed_equals_whole_and_usage_equals_tokenize(client, model, cluster):
    args = dict(
        model=model,
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=10,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    whole = client.chat.completions.create(**args)
    msg = whole.choices[0].message
    assert msg.role == "assistant"
    assert whole.usage.completion_tokens == 10
    # The rendered template begins with the BOS token, which Tokenize's add_bos_token adds.
    assert whole.usage.prompt_tokens == tokenize_count(cluster[0], CHAT_PROMPT_TEXT)
    chunks = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == msg.content
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_usage_counts_the_prompt_tokens_taken_from_the_prefix_cache(client, model):
    # A prompt no other test sends: the first time nothing is cached, the second time every
    # whole block of 16 tokens but the one holding the last prompt token is.
    prompt = "Cached tokens come from an earlier prompt with the same prefix. " * 5
    args = dict(model=model, prompt=prompt, max_tokens=2, temperature=0)
    first = client.completions.create(**args)
    n = first.usage.prompt_tokens
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    again = client.completions.create(**args)
    assert again.usage.prompt_tokens_details.cached_tokens == (n - 1) // 16 * 16 > 0
    chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == (n - 1) // 16 * 16


def test_stop_strings_are_honoured(client, model):
    args = dict(model=model, prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    text = client.completions.create(**args).choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop
    want = text[: text.index(stop)]
    r = client.completions.create(**args, stop=[stop])
    assert r.choices[0].text == want
    assert r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(**args, stop=stop, stream=True))
    assert streamed == want


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(temperature=-1), "temperature"),
        (dict(n=2), "n"),
        (dict(top_p=0), "top_p"),
        (dict(presence_penalty=0.5), "presence_penalty"),
    ],
)
def test_bad_requests_are_400_naming_the_field(client, model, kwargs, field):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt="x", **kwargs)
    assert e.value.status_code == 400
    assert e.value.param == field
    assert field in e.value.message


def test_chat_with_an_unknown_role_is_400(client, model):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=[{"role": "robot", "content": "x"}], max_tokens=2)
    assert e.value.param == "messages"


def test_an_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
