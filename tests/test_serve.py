"""gpt/serve.py: the page's API gives the project's own numbers (tokens of generate, probabilities
of the step's scores, GPT.attention_probabilities), refuses bad requests with a 4xx and keeps
serving, stops a generation whose reader went away; and a real headless browser drives the page."""

import http.client
import json
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

import sample
import train
from gpt import GPT, GPTConfig
from gpt.errors import UserError
from gpt.sampling import SamplingConfig, generate, steps
from gpt.serve import Limits, Server, load_server, make_server
from gpt.tokenizer import CharTokenizer

from conftest import ROOT
from test_train import args as train_args

TEXT = "ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun.\n"


class Running:
    """A Server on a free port of 127.0.0.1, serving from a thread, and requests to it."""

    def __init__(self, app: Server):
        self.app = app
        self.http = make_server(app, "127.0.0.1", 0)
        self.port = self.http.server_address[1]
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def post(self, path: str, body, raw: bool = False):
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        connection.request("POST", path, body if raw else json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        data = response.read()
        connection.close()
        if path == "/api/generate" and response.status == 200:
            return response.status, [json.loads(line) for line in data.splitlines()]
        return response.status, json.loads(data)

    def get(self, path: str):
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()

    def close(self):
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, char_data):
    out = tmp_path_factory.mktemp("serve") / "run"
    train.main(train_args(char_data, out, "--max_iters=30", "--model.position=rope"))
    return out


def model_args(out_dir):
    class Args:
        pass

    a = Args()
    a.out_dir, a.ckpt, a.init_from = str(out_dir), None, None
    a.model_defaults = {"out_dir": None, "ckpt": "ckpt.pt"}
    return a


@pytest.fixture(scope="module")
def served(run_dir):
    app = load_server(model_args(run_dir), torch.device("cpu"), torch.float32, Limits(new_tokens=400, generations=1))
    running = Running(app)
    yield running
    running.close()


def generated(events):
    return [e["token"] for e in events if "token" in e]


@pytest.mark.parametrize("method, settings", [
    ("greedy", {}),
    ("sample", {"temperature": 0.9, "top_k": 20, "top_p": 0.95}),
    ("sample", {"temperature": 1.2, "min_p": 0.05, "repetition_penalty": 1.3}),
    ("contrastive", {"penalty_alpha": 0.6, "top_k": 4}),
])
def test_a_generation_streams_the_tokens_and_probabilities_of_the_sampling_code(served, method, settings):
    status, events = served.post("/api/generate", {"prompt": "ROMEO:", "method": method, "max_new_tokens": 40,
                                                   "seed": 7, **settings})
    assert status == 200 and events[-1]["done"] in ("length", "eos")
    model, tok = served.app.model, served.app.tok
    idx = torch.tensor([tok.encode("ROMEO:")])
    config = SamplingConfig(**({"temperature": 0.0} if method == "greedy" else {}), **settings)
    expected = generate(model, idx, 40, config, generator=torch.Generator().manual_seed(7), eos_token_id=tok.eot_token)
    tokens = generated(events)
    assert [t["id"] for t in tokens] == expected[0, idx.size(1):].tolist()
    assert "".join(t["text"] for t in events[0]["prompt"]) == "ROMEO:"
    # each probability is softmax of the step's scores, after the processors
    reference = steps(model, idx, 40, config, generator=torch.Generator().manual_seed(7), eos_token_id=tok.eot_token)
    for token, step in zip(tokens, reference):
        probs = torch.softmax(step.scores[0], -1)
        assert token["p"] == pytest.approx(float(probs[token["id"]]), abs=1e-6)
        top = torch.topk(probs, 10)
        assert [a["id"] for a in token["top"]] == top.indices.tolist()
        assert [a["p"] for a in token["top"]] == pytest.approx(top.values.tolist(), abs=1e-6)


def test_beam_search_comes_at_the_end_with_the_models_probabilities(served):
    status, events = served.post("/api/generate", {"prompt": "ROMEO:", "method": "beam", "num_beams": 3,
                                                   "max_new_tokens": 12})
    model, tok = served.app.model, served.app.tok
    idx = torch.tensor([tok.encode("ROMEO:")])
    out = generate(model, idx, 12, num_beams=3, eos_token_id=tok.eot_token)[0]
    tokens = generated(events)
    assert status == 200 and [t["id"] for t in tokens] == out[idx.size(1):].tolist()
    with torch.no_grad():
        probs = torch.softmax(model.logits(model.hidden_states(out[None]))[0], -1)
    assert tokens[0]["p"] == pytest.approx(float(probs[idx.size(1) - 1, tokens[0]["id"]]), abs=1e-6)


def test_attention_equals_the_models_own(served):
    tok, model = served.app.tok, served.app.model
    ids = tok.encode(TEXT)
    status, answer = served.post("/api/attention", {"tokens": ids, "query": 40})
    assert status == 200 and answer["start"] == 0 and answer["query"] == 40
    probs = model.attention_probabilities(torch.tensor([ids[:41]]))[:, 0]  # (L, H, T, T)
    row = probs[:, :, -1]
    assert (answer["layers"], answer["heads"]) == (model.config.n_layer, model.config.n_head)
    torch.testing.assert_close(torch.tensor(answer["rows"]), row, atol=1e-5, rtol=0)
    entropy = -(row * row.clamp(min=1e-12).log()).sum(-1)
    torch.testing.assert_close(torch.tensor(answer["entropy"]), entropy, atol=1e-4, rtol=0)
    import base64

    maps = torch.frombuffer(bytearray(base64.b64decode(answer["maps"])), dtype=torch.uint8)
    n = answer["map_size"]
    assert n == 41 and maps.numel() == row.size(0) * row.size(1) * n * n
    expected = (probs[:, :, -n:, -n:] * 255).round().to(torch.uint8).flatten()
    assert torch.equal(maps, expected)


def test_every_attention_design_can_be_looked_into():
    tok = CharTokenizer(TEXT)
    designs = [dict(position="alibi"), dict(n_kv_head=1), dict(block="gau"), dict(attention="linear"),
               dict(attention="synthesizer_dense"), dict(attention_window=8), dict(attention_scale="logn")]
    for design in designs:
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=32, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32,
                              **design)).eval()
        running = Running(Server(model, tok, torch.device("cpu"), torch.float32, Limits()))
        try:
            status, events = running.post("/api/generate", {"prompt": "ROMEO", "method": "greedy",
                                                            "max_new_tokens": 8})
            assert status == 200 and len(generated(events)) == 8, design
            ids = [t["id"] for t in events[0]["prompt"] + generated(events)]
            status, answer = running.post("/api/attention", {"tokens": ids, "query": len(ids) - 1})
            assert status == 200, (design, answer)
            expected = model.attention_probabilities(torch.tensor([ids]))[:, 0, :, -1]
            torch.testing.assert_close(torch.tensor(answer["rows"]), expected, atol=1e-5, rtol=0)
        finally:
            running.close()


@pytest.mark.parametrize("body, status, message", [
    ({"prompt": "a", "max_new_tokens": -3}, 400, "max_new_tokens must be from 1 to 400"),
    ({"prompt": "a", "max_new_tokens": 401}, 400, "max_new_tokens must be from 1 to 400"),
    ({"prompt": "a", "method": "nucleus"}, 400, "unknown method 'nucleus': use one of greedy, sample"),
    ({"prompt": "a", "temprature": 1}, 400, "unknown field(s) temprature"),
    ({"prompt": "a", "temperature": -1}, 400, "temperature must be >= 0"),
    ({"prompt": "a", "top_k": "many"}, 400, "top_k must be a whole number"),
    ({"prompt": "a", "method": "beam", "num_beams": 50}, 400, "beam search needs num_beams from 2 to 8"),
    ({"prompt": "a" * 5000}, 413, "the prompt is 5,000 tokens; the limit is 2,048"),
    ({"prompt": 12}, 400, "prompt must be a string"),
    ({"prompt": "a", "top_k": 4.5}, 400, "top_k must be a whole number"),
    ({"prompt": "a", "seed": 10**30}, 400, "seed must be from 0 to 2**63 - 1"),
    ({"prompt": "a", "max_new_tokens": True}, 400, "max_new_tokens must be a whole number"),
    ({"prompt": "a", "temperature": float("nan")}, 400, "temperature must be a number between -1e6 and 1e6"),
    ({"prompt": "a", "temperature": 10**400}, 400, "temperature must be a number between -1e6 and 1e6"),
    ({"prompt": "a", "method": "beam", "num_beams": 2, "length_penalty": 1e5}, 400, "length_penalty must be from"),
    ({"prompt": "a", "method": ["beam"]}, 400, "unknown method"),
    ({"prompt": "日本"}, 400, "2 character(s) not in this char tokenizer's vocabulary"),
    ([1, 2], 400, "the body must be a JSON object"),
])
def test_bad_requests_get_a_4xx_and_the_server_keeps_serving(served, body, status, message):
    got, answer = served.post("/api/generate", body)
    assert got == status and message in answer["error"] and len(answer["error"].splitlines()) == 1
    assert served.post("/api/generate", {"prompt": "a", "method": "greedy", "max_new_tokens": 2})[0] == 200


def test_malformed_and_misdirected_requests(served):
    assert served.post("/api/generate", b"{not json", raw=True)[0] == 400
    status, answer = served.post("/api/attention", {"tokens": [1, 2, 10_000]})
    assert status == 400 and "tokens must be a non-empty list of ids" in answer["error"]
    assert served.post("/api/attention", {"tokens": [1, 2], "query": 2})[0] == 400
    assert served.post("/api/nothing", {})[0] == 404
    assert served.get("/nothing")[0] == 404
    assert served.post("/api/stop", {"id": "nope"})[0] == 404
    assert served.post("/api/classify", {"text": "x"})[0] == 400  # a language model
    status, page = served.get("/")
    assert status == 200 and b"<title>gpt: watch it generate</title>" in page
    status, info = served.get("/api/info")
    info = json.loads(info)
    assert info["kind"] == "lm" and info["layers"] == 2 and info["limits"]["new_tokens"] == 400
    assert {s["name"]: s["default"] for s in info["settings"]}["temperature"] == 0.8  # sample.py's


def test_a_content_length_that_is_no_number(served):
    connection = http.client.HTTPConnection("127.0.0.1", served.port, timeout=60)
    connection.putrequest("POST", "/api/generate")
    connection.putheader("Content-Length", "lots")
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 400 and "Content-Length must be a whole number" in json.loads(response.read())["error"]


def test_a_request_over_the_size_limit(served):
    connection = http.client.HTTPConnection("127.0.0.1", served.port, timeout=60)
    connection.putrequest("POST", "/api/generate")
    connection.putheader("Content-Length", str(10 << 20))
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413 and "the limit is 1,048,576" in json.loads(response.read())["error"]


def test_a_disconnect_stops_the_generation_and_a_stop_ends_one(served):
    app = served.app
    calls = []
    hook = app.model.transformer.h[0].register_forward_hook(lambda *a: calls.append(1))  # once per model call
    try:
        raw = socket.create_connection(("127.0.0.1", served.port))
        body = json.dumps({"prompt": "ROMEO:", "method": "greedy", "max_new_tokens": 400}).encode()
        raw.sendall(b"POST /api/generate HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: "
                    + str(len(body)).encode() + b"\r\n\r\n" + body)
        received = b""
        while received.count(b"\n") < 12:  # the headers and a few tokens
            received += raw.recv(4096)
        raw.close()
        deadline = time.time() + 20
        while app.running and time.time() < deadline:  # the server notices at its next write
            time.sleep(0.05)
        assert not app.running  # the slot is free again
        settled = len(calls)
        time.sleep(0.5)
        assert len(calls) == settled < 400  # the model is no longer called
        # the only slot is free: a new generation runs, and /api/stop ends it
        connection = http.client.HTTPConnection("127.0.0.1", served.port, timeout=60)
        connection.request("POST", "/api/generate", json.dumps({"prompt": "a", "method": "greedy",
                                                                "max_new_tokens": 400}))
        response = connection.getresponse()
        first = json.loads(response.readline())
        assert served.post("/api/generate", {"prompt": "a"})[0] == 429  # one at a time (--max_generations=1)
        assert served.post("/api/stop", {"id": first["id"]}) == (200, {"stopping": first["id"]})
        last = [json.loads(line) for line in response.read().splitlines()][-1]
        assert last == {"done": "stopped"}
    finally:
        hook.remove()


def test_a_classifier_checkpoint_shows_its_labels(tmp_path):
    from gpt.classify import predict
    from test_classify import args as classify_args, sms_slice

    train.main(classify_args(sms_slice(tmp_path, 200), tmp_path / "clf", "--max_iters=4"))
    app = load_server(model_args(tmp_path / "clf"), torch.device("cpu"), torch.float32, Limits())
    running = Running(app)
    try:
        status, answer = running.post("/api/classify", {"text": "WINNER!! Claim your prize now"})
        result = predict(app.model, app.tok, app.ckpt, ["WINNER!! Claim your prize now"], "cpu")[0]
        label, probs = result["label"], result["probabilities"]
        assert status == 200 and answer["label"] == label and answer["labels"] == list(probs)
        assert answer["probabilities"] == pytest.approx(list(probs.values()))
        assert json.loads(running.get("/api/info")[1])["kind"] == "classifier"
        assert running.post("/api/generate", {"prompt": "a"})[0] == 400
    finally:
        running.close()
    # a classifier of scores (a regression) has no labels to show: one line naming gpt.classify
    train.main(classify_args(sms_slice(tmp_path, 200), tmp_path / "reg", "--max_iters=1", "--classify.target=score"))
    with pytest.raises(UserError, match="the page shows language models and single-text classifiers of labels"):
        load_server(model_args(tmp_path / "reg"), torch.device("cpu"), torch.float32, Limits())


def test_the_command_line_serves_warns_off_localhost_and_names_a_busy_port(run_dir):
    command = [sys.executable, "-m", "gpt.serve", f"--out_dir={run_dir}", "--port=0", "--host=0.0.0.0"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert line.startswith(f"serving {run_dir / 'ckpt.pt'} at http://0.0.0.0:")
        port = int(line.split(":")[-1].split("/")[0])
        assert "warning: listening on 0.0.0.0" in process.stderr.readline()
        busy = subprocess.run([sys.executable, "-m", "gpt.serve", f"--out_dir={run_dir}", f"--port={port}"], cwd=ROOT,
                              capture_output=True, text=True)
        assert busy.returncode == 2 and busy.stderr.strip().splitlines() == [
            f"error: port {port} on 127.0.0.1 is in use: pick another with --port"]
    finally:
        process.terminate()
        process.wait(10)


# ---- a real browser ----------------------------------------------------------------------------------


def browser():
    """Headless Chromium through Selenium, or the reason there is none."""
    try:
        from selenium import webdriver
    except ImportError:
        return None, "selenium is not installed (pip install -e \".[dev]\")"
    binary = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not binary or not driver:
        return None, "no Chromium and chromedriver here (Debian: apt-get install chromium chromium-driver)"
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(flag)
    from selenium.webdriver.chrome.service import Service

    return webdriver.Chrome(options=options, service=Service(driver)), None


@pytest.mark.slow
def test_the_page_in_a_headless_browser(served, run_dir, tmp_path, capsys):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    driver, reason = browser()
    if driver is None:
        pytest.skip(reason)
    try:
        driver.get(f"http://127.0.0.1:{served.port}/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_element(By.ID, "layer").find_elements(By.TAG_NAME, "option"))
        prompt = driver.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys("JULIET:")
        Select(driver.find_element(By.ID, "method")).select_by_value("greedy")
        n = driver.find_element(By.ID, "max_new_tokens")
        n.clear()
        n.send_keys("60")
        driver.find_element(By.ID, "generate").click()
        wait.until(lambda d: d.find_element(By.ID, "status").text.startswith("done"))
        text = driver.execute_script(
            "return Array.from(document.querySelectorAll('#output .tok:not(.eot)')).map(s => s.textContent).join('')")
        # sample.py, greedy, on the same checkpoint
        sample.main([f"--out_dir={run_dir}", "--prompt=JULIET:", "--temperature=0", "--max_new_tokens=60",
                     "--num_samples=1", "--no-stream"])
        expected = capsys.readouterr().out[:-1]  # print's newline
        assert text == expected and len(text) > len("JULIET:")
        spans = driver.find_elements(By.CSS_SELECTOR, "#output .tok")
        spans[-5].click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#grid canvas")) > 0)
        model = served.app.model
        assert len(driver.find_elements(By.CSS_SELECTOR, "#grid canvas")) == model.config.n_layer * model.config.n_head
        assert len(driver.find_elements(By.CSS_SELECTOR, "#alternatives tr")) == 1 + 10
        driver.save_screenshot(str(tmp_path / "page.png"))
        assert (tmp_path / "page.png").stat().st_size > 10_000
    finally:
        driver.quit()
