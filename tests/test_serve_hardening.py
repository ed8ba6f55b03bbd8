"""`shardline serve` against what a hostile or careless client sends: bodies too big for
the server or big enough to stall it, text no UTF-8 can carry, nesting deep enough to
overflow a parser, connections that never finish a request, clients that leave. Real
server subprocesses with worker processes, driven over raw sockets and httpx."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardline.models import minilm
from tests.serve_fixtures import Server

GOOD = {"model": "minilm", "input": "a sentence that is fine"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Default limits, two worker processes."""
    s = Server(tmp_path_factory.mktemp("minilm") / "err.log", "--stages", "2")
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(scope="module")
def gpt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("gpt") / "err.log", "--model", "gpt", "--stages",
               "1", "--workers", "0")
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(scope="module")
def tight(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Short deadlines, and room for a body big enough to stall a server that
    tokenized on its event loop."""
    s = Server(tmp_path_factory.mktemp("tight") / "err.log", "--stages", "2",
               "--header-timeout", "1", "--body-timeout", "5",
               "--max-body-bytes", str(16_000_000))
    try:
        yield s
    finally:
        s.close()


# --- HTTP/1.1 over a plain socket: which connection a request uses is then ours to say


def send_request(sock: socket.socket, path: str, body: bytes = b"", method: str = "POST",
                 length: int | None = None) -> None:
    """``length``: the Content-Length to declare, if not the body's."""
    sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Type: "
                 f"application/json\r\nContent-Length: {len(body) if length is None else length}"
                 "\r\n\r\n".encode() + body)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response with a Content-Length (what the API sends but for streams)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError(f"connection closed after {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip()
               for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError("connection closed in the body")
        body += chunk
    return int(lines[0].split()[1]), headers, body[:length]


def exchange(sock: socket.socket, path: str, body: bytes = b"",
             method: str = "POST") -> tuple[int, dict[str, str], bytes]:
    send_request(sock, path, body, method)
    return read_response(sock)


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def assert_openai_error(body: bytes, param: str | None = None) -> dict[str, Any]:
    error = json.loads(body)["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] and set(error) == {"message", "type", "param", "code"}
    if param is not None:
        assert error["param"] == param, error
    return dict(error)


def deep(depth: int, inner: bytes = b"") -> bytes:
    return b"[" * depth + inner + b"]" * depth


# --- Defect 3: 400s, not 500s, and the connection goes on


EMBEDDING_CASES: list[tuple[str, bytes, int, str | None]] = [
    ("lone surrogate", b'{"model": "minilm", "input": "\\ud800"}', 400, "input"),
    ("lone surrogate in a list", b'{"model": "minilm", "input": ["ok", "x \\udfff"]}',
     400, "input"),
    ("reversed pair", b'{"model": "minilm", "input": "\\ude00\\ud83d"}', 400, "input"),
    ("lone surrogate as the model", b'{"model": "\\ud800", "input": "x"}', 404, "model"),
    ("lone surrogate as the format",
     b'{"model": "minilm", "input": "x", "encoding_format": "\\ud800"}', 400,
     "encoding_format"),
    ("100,000-deep input", b'{"model": "minilm", "input": ' + deep(100_000) + b"}", 400,
     None),
    ("100,000-deep body", deep(100_000), 400, None),
    ("20,000-deep body (parsed inline)", deep(20_000), 400, None),
    ("100,000-deep objects", b'{"a": ' * 100_000 + b"1" + b"}" * 100_000, 400, None),
    ("5000-digit number", b'{"model": "minilm", "input": "x", "n": ' + b"7" * 5000 + b"}",
     400, None),
    ("not UTF-8", b'{"model": "minilm", "input": "\xed\xa0\x80"}', 400, None),
    ("NaN as the input", b'{"model": "minilm", "input": NaN}', 400, "input"),
    ("empty body", b"", 400, None),
]


@pytest.mark.timeout(180)
def test_bad_text_and_deep_nesting_are_400s_and_the_connection_goes_on(
        server: Server) -> None:
    with server.connect() as sock:
        for name, body, status, param in EMBEDDING_CASES:
            got, _, answer = exchange(sock, "/v1/embeddings", body)
            assert got == status, (name, answer[:200])
            assert_openai_error(answer, param)
            # the same connection answers the next request
            got, _, answer = exchange(sock, "/v1/embeddings", json.dumps(GOOD).encode())
            assert got == 200, (name, answer[:200])
            assert len(json.loads(answer)["data"][0]["embedding"]) == 384
    assert not server.errors()


COMPLETION_CASES: list[tuple[str, dict[str, Any] | bytes, int, str | None]] = [
    ("lone surrogate prompt", {"prompt": "\ud800"}, 400, "prompt"),
    ("lone surrogate in a one-prompt list", {"prompt": ["ab\udbff"]}, 400, "prompt"),
    ("seed past 64 bits", {"prompt": "x", "seed": 1 << 64}, 400, "seed"),
    ("seed far past 64 bits", {"prompt": "x", "seed": 10 ** 40}, 400, "seed"),
    ("stream as a string", {"prompt": "x", "stream": "yes"}, 400, "stream"),
    ("infinite max_tokens", b'{"model": "gpt", "prompt": "x", "max_tokens": 1e400}', 400,
     "max_tokens"),
    ("NaN temperature", b'{"model": "gpt", "prompt": "x", "temperature": NaN}', 400,
     "temperature"),
    ("deep stop", b'{"model": "gpt", "prompt": "x", "stop": ' + deep(100_000) + b"}", 400,
     None),
    ("stop of lists", {"prompt": "x", "stop": [["a"]]}, 400, "stop"),
]


@pytest.mark.timeout(180)
def test_completions_bad_fields_are_400s_and_the_connection_goes_on(gpt: Server) -> None:
    good = json.dumps({"model": "gpt", "prompt": "Once", "max_tokens": 2}).encode()
    with gpt.connect() as sock:
        for name, case, status, param in COMPLETION_CASES:
            body = case if isinstance(case, bytes) else json.dumps(
                {"model": "gpt", **case}).encode()
            got, _, answer = exchange(sock, "/v1/completions", body)
            assert got == status, (name, answer[:200])
            assert_openai_error(answer, param)
            got, _, answer = exchange(sock, "/v1/completions", good)
            assert got == 200, (name, answer[:200])
        # a stop sequence no UTF-8 text can hold is harmless: it never matches
        body = json.dumps({"model": "gpt", "prompt": "x", "max_tokens": 3,
                           "stop": ["\udc00"]}).encode()
        got, _, answer = exchange(sock, "/v1/completions", body)
        assert got == 200 and json.loads(answer)["choices"][0]["finish_reason"] == "length"
    assert not gpt.errors()


# Anything JSON can say, with text no UTF-8 can carry often among it.
texts = st.text(max_size=20) | st.text(st.characters(categories=["Cs"]), min_size=1,
                                       max_size=3).map(lambda t: f"x{t}")
anything = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=8)


def fields(**known: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """A body with each known field absent, sensible, or anything at all."""
    return st.fixed_dictionaries({}, optional={name: strategy | anything
                                               for name, strategy in known.items()})


FUZZ = settings(max_examples=120, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def assert_not_our_fault(r: httpx.Response) -> None:
    assert r.status_code in (200, 400, 404), (r.status_code, r.text[:300])
    if r.status_code != 200:
        assert_openai_error(r.content)


@pytest.mark.timeout(600)
def test_any_embeddings_body_is_answered_without_a_5xx(server: Server) -> None:
    bodies = fields(model=st.just("minilm"), input=texts | st.lists(texts, max_size=3),
                    encoding_format=st.sampled_from(["float", "base64"]), user=texts)

    with httpx.Client(base_url=server.url, timeout=60) as client:
        @FUZZ
        @given(bodies)
        def check(body: dict[str, Any]) -> None:
            assert_not_our_fault(client.post("/v1/embeddings", content=json.dumps(body)))

        check()
    assert not server.errors()


@pytest.mark.timeout(600)
def test_any_completions_body_is_answered_without_a_5xx(gpt: Server) -> None:
    bodies = fields(
        model=st.just("gpt"), prompt=texts | st.lists(texts, max_size=2),
        max_tokens=st.integers(-1, 3), temperature=st.floats(-1, 3),
        top_p=st.floats(-1, 2), seed=st.integers(-(1 << 70), 1 << 70),
        stop=texts | st.lists(texts, max_size=5), stream=st.booleans(),
        n=st.integers(0, 2), best_of=st.integers(0, 2))

    with httpx.Client(base_url=gpt.url, timeout=60) as client:
        @FUZZ
        @given(bodies)
        def check(body: dict[str, Any]) -> None:
            if isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 3:
                body["max_tokens"] = 3  # valid, and quick
            assert_not_our_fault(client.post("/v1/completions", content=json.dumps(body)))

        check()
    assert not gpt.errors()


# --- Defect 2: a body too big is a 413, and a big one does not stall the server


@pytest.mark.timeout(180)
def test_a_body_over_the_limit_is_413_and_the_server_keeps_serving(server: Server) -> None:
    huge = json.dumps({"model": "minilm", "input": "word " * 2_000_000}).encode()  # 10 MB
    with httpx.Client(base_url=server.url, timeout=60) as client:
        r = client.post("/v1/embeddings", content=huge,
                        headers={"Content-Type": "application/json"})
        assert r.status_code == 413, r.text[:200]
        assert "--max-body-bytes" in assert_openai_error(r.content)["message"]
        assert client.get("/healthz").status_code == 200
        assert client.post("/v1/embeddings", json=GOOD).status_code == 200

    # The 413 comes from the declared length, before a byte of the body; the server
    # then reads and drops the body, and the connection goes on.
    with server.connect() as sock:
        send_request(sock, "/v1/embeddings", length=len(huge))
        status, headers, answer = read_response(sock)
        assert status == 413 and "close" not in headers.get("connection", "")
        sock.sendall(huge)
        assert exchange(sock, "/v1/embeddings", json.dumps(GOOD).encode())[0] == 200

    # A client waiting for "100 Continue" never sends the body: the connection ends.
    with server.connect() as sock:
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: test\r\nExpect: 100-continue"
                     b"\r\nContent-Length: %d\r\n\r\n" % len(huge))
        status, headers, answer = read_response(sock)
        assert status == 413 and headers["connection"] == "close"
        assert read_until_closed(sock) == b""

    # A chunked body has no declared length: counted as it comes.
    with server.connect() as sock:
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: test\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        piece = b"x" * 65536
        try:
            for _ in range(64):  # 4 MiB, twice the limit
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        except OSError:  # the server may answer and stop reading before the end
            pass
        status, _, answer = read_response(sock)
        assert status == 413
        assert_openai_error(answer)
    assert httpx.get(f"{server.url}/healthz", timeout=60).status_code == 200
    metrics = server.metrics()
    assert metrics['shardline_requests_total{endpoint="/v1/embeddings",status="413"}'] >= 3
    assert not server.errors()


@pytest.mark.timeout(300)
def test_a_big_body_is_worked_on_while_other_requests_are_answered(tight: Server) -> None:
    """10 MB of text to tokenize: seconds of work. A server that did it on its event loop
    answered nothing meanwhile (and its workers, missing heartbeats, were declared
    lost); here small requests and /healthz keep being answered while it runs."""
    big = json.dumps({"model": "minilm", "input": ["word " * 500_000] * 4}).encode()
    small_done: list[int] = []
    health: list[int] = []
    big_done = threading.Event()
    big_answer: list[tuple[int, bytes]] = []

    def big_request() -> None:
        with tight.connect(timeout=240) as sock:
            status, _, answer = exchange(sock, "/v1/embeddings", big)
            big_answer.append((status, answer))
            big_done.set()

    def small_requests() -> None:
        with httpx.Client(base_url=tight.url, timeout=120) as client:
            i = 0
            while not big_done.is_set():
                r = client.post("/v1/embeddings", json={"model": "minilm",
                                                         "input": f"small request {i}"})
                if not big_done.is_set():  # answered while the big one was running
                    small_done.append(r.status_code)
                if i % 5 == 0:
                    health.append(client.get("/healthz").status_code)
                i += 1

    threads = [threading.Thread(target=big_request), threading.Thread(target=small_requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not any(t.is_alive() for t in threads)
    status, answer = big_answer[0]
    assert status == 400  # every input is far over the model's 256 tokens
    assert assert_openai_error(answer, "input")["code"] == "context_length_exceeded"
    assert len(small_done) >= 3 and set(small_done) == {200}, small_done
    assert health and set(health) == {200}, health
    with httpx.Client(base_url=tight.url, timeout=60) as client:
        assert client.get("/healthz").status_code == 200
        # a big answer, encoded on a worker thread, is the same JSON a small one is
        texts = [f"text number {i}" for i in range(300)]
        r = client.post("/v1/embeddings", json={"model": "minilm", "input": texts,
                                                 "encoding_format": "float"})
        assert r.status_code == 200
        data = r.json()["data"]
        assert [d["index"] for d in data] == list(range(300))
        one = client.post("/v1/embeddings", json={"model": "minilm", "input": texts[7]})
        assert one.json()["data"][0]["embedding"] == pytest.approx(data[7]["embedding"],
                                                                    abs=1e-5)
    assert not tight.errors()


# --- Connections that never finish a request


@pytest.mark.timeout(180)
def test_connections_that_stall_are_closed(tight: Server) -> None:
    before = tight.metrics()
    idle = [tight.connect() for _ in range(50)]
    heads = [tight.connect() for _ in range(20)]
    bodies = [tight.connect() for _ in range(20)]
    for sock in heads:
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: test\r\nContent-Le")
    for sock in bodies:
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: test\r\n"
                     b"Content-Length: 100\r\n\r\n{\"model\": ")
    flood = tight.connect()  # just over 64 KiB of head, all read before the answer
    flood.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n" +
                  b"".join(b"X-Padding-%03d: %s\r\n" % (i, b"y" * 100) for i in range(600)))
    # a dripping body: a byte a second never makes a 5 s deadline for 100 bytes
    drip = tight.connect()
    drip.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: test\r\nContent-Length: 100\r\n\r\n")
    for _ in range(7):
        try:
            drip.sendall(b" ")
        except OSError:
            break
        time.sleep(1)

    for sock in idle:
        assert read_until_closed(sock) == b""
    for sock in heads:
        status, _, answer = read_response(sock)
        assert status == 408
        assert_openai_error(answer)
        assert read_until_closed(sock) == b""
    for sock in [*bodies, drip]:
        status, headers, answer = read_response(sock)
        assert status == 408 and headers["connection"] == "close"
        assert_openai_error(answer)
        assert read_until_closed(sock) == b""
    assert read_until_closed(flood).startswith(b"HTTP/1.1 431 ")
    for sock in [*idle, *heads, *bodies, flood, drip]:
        sock.close()

    # Answered 413 by its declared length, a body is read and dropped, within bounds:
    # a dripping one for --body-timeout seconds, a big one up to 16 MiB.
    with tight.connect() as slow:
        send_request(slow, "/v1/embeddings", length=20_000_000)
        assert read_response(slow)[0] == 413
        for _ in range(12):
            try:
                slow.sendall(b"x")
            except OSError:
                break
            time.sleep(1)
        assert read_until_closed(slow) == b""
    with tight.connect() as big:
        send_request(big, "/v1/embeddings", length=40_000_000)
        assert read_response(big)[0] == 413
        try:
            for _ in range(40):
                big.sendall(b"x" * 1_000_000)
        except OSError:  # closed past 16 MiB
            pass
        assert read_until_closed(big) == b""

    after = tight.metrics()

    def grew(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert grew('shardline_serve_connections_closed_total{reason="header_timeout"}') >= 70
    assert grew('shardline_serve_connections_closed_total{reason="header_too_large"}') >= 1
    assert grew('shardline_requests_total{endpoint="/v1/embeddings",status="408"}') >= 21
    assert grew('shardline_serve_connections_closed_total{reason="drain_timeout"}') >= 1
    assert grew('shardline_serve_connections_closed_total{reason="drain_too_large"}') >= 1
    # and the server still answers
    with httpx.Client(base_url=tight.url, timeout=60) as client:
        assert client.post("/v1/embeddings", json=GOOD).status_code == 200
    assert not tight.errors()


# --- Clients that leave, /openapi.json, 405


@pytest.mark.timeout(180)
def test_a_client_that_leaves_is_counted_499_and_is_no_error(server: Server,
                                                             gpt: Server) -> None:
    before = server.metrics()
    with server.connect() as sock:  # gone in the middle of its body
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: test\r\n"
                     b"Content-Length: 100\r\n\r\n{\"model\": ")
    with server.connect() as sock:  # gone while its answer is worked out
        texts = [f"a longer text to embed, number {i}, " * 8 for i in range(64)]
        send_request(sock, "/v1/embeddings",
                     json.dumps({"model": "minilm", "input": texts}).encode())
    gpt_before = gpt.metrics()
    with gpt.connect() as sock:  # gone in the middle of a stream
        send_request(sock, "/v1/completions", json.dumps(
            {"model": "gpt", "prompt": "Once upon", "max_tokens": 110,
             "stream": True}).encode())
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")

    def counted(s: Server, metrics: dict[str, float], status: str, endpoint: str) -> float:
        key = f'shardline_requests_total{{endpoint="{endpoint}",status="{status}"}}'
        return s.metrics().get(key, 0.0) - metrics.get(key, 0.0)

    deadline = time.monotonic() + 60
    while counted(server, before, "499", "/v1/embeddings") < 2 or \
            counted(gpt, gpt_before, "499", "/v1/completions") < 1:
        assert time.monotonic() < deadline, "the departures were never counted"
        time.sleep(0.2)
    assert counted(server, before, "500", "/v1/embeddings") == 0
    assert counted(gpt, gpt_before, "500", "/v1/completions") == 0
    assert not server.errors() and not gpt.errors()


def test_openapi_json_describes_the_api_and_405_says_allow(server: Server) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        spec = client.get("/openapi.json").json()
        r = client.get("/v1/embeddings")
    assert spec["openapi"].startswith("3.")
    embeddings = spec["paths"]["/v1/embeddings"]["post"]
    schema = embeddings["requestBody"]["content"]["application/json"]["schema"]
    assert set(schema["required"]) == {"model", "input"}
    assert "$defs" not in schema  # refs inside would not resolve from the document root
    assert {"200", "400", "413", "429", "503"} <= set(embeddings["responses"])
    assert "requestBody" in spec["paths"]["/v1/completions"]["post"]
    assert {"/v1/models", "/healthz", "/metrics"} <= set(spec["paths"])
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert_openai_error(r.content)


def test_the_event_loop_lag_is_in_the_metrics(server: Server) -> None:
    metrics = server.metrics()
    assert metrics["shardline_serve_loop_lag_seconds_count"] > 0
    assert 'shardline_serve_loop_lag_seconds_bucket{le="+Inf"}' in metrics


def test_tokens_padded_from_ids_match_the_batch_tokenizer() -> None:
    tokenizer = minilm.Tokenizer()
    texts = ["short", "a somewhat longer sentence, with punctuation!", "word " * 300, ""]
    ids, mask = minilm.pad(tokenizer.encode(texts[:2] + texts[3:]))
    want_ids, want_mask = tokenizer(texts[:2] + texts[3:])
    assert ids.equal(want_ids) and mask.equal(want_mask)
    assert [len(row) for row in tokenizer.encode(texts)][2] == tokenizer.count(texts[2]) == 302
