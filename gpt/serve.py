"""Watch a model generate, in a web page: python -m gpt.serve.

    python -m gpt.serve --out_dir=out/shakespeare_char      # then open http://127.0.0.1:8000
    python -m gpt.serve --init_from=gpt2 --port=8080        # GPT-2 from Hugging Face (needs the network once)
    python -m gpt.serve --out_dir=out/sms_spam              # a classifier: the label and its probabilities

The page (gpt/assets/serve.html: one file, no build step, nothing fetched from the
network) takes a prompt and the decoding settings of sample.py (same names, same
defaults) and shows the text as it is generated, each token coloured by its
probability. Clicking a token shows the ten tokens the model found likeliest there
and, for any layer and head (or the heads' average), how much that token attended to
each earlier one: as a heat strip over the text, as a grid of small maps (one per layer
and head, the last 48 positions; gpt.inspect draws the same maps as a PNG), and as the
entropy of each head's attention.

The numbers are the project's own. Tokens come from gpt.sampling.steps, so they
equal sample.py's and generate()'s for the same settings and seed. Probabilities are
softmax(scores) of the step: the scores after the logits processors (repetition
penalty, temperature, top-k, top-p, min-p), which is the distribution a sampled
token was drawn from. Tokens a processor removed have probability 0. Beam search
picks its text only at the end. Its tokens then come all at once, with the model's
own next-token probabilities (no processor). Attention is GPT.attention_probabilities
over the text up to the clicked token: its last block_size tokens for models with
learned positions, its last 1,024 for the others.

API (JSON in, JSON out; errors are a 4xx, or a 500 for a bug, with {"error": one line}):
    GET  /                the page
    GET  /api/info        the model (kind, layers, heads, tokenizer), the settings with their defaults, the limits
    POST /api/generate    {"prompt", "method": greedy|sample|contrastive|beam, "max_new_tokens", "seed", settings}
                          -> one JSON object per line as it happens: {"id", "prompt": [token]}, then
                          {"token": {"id", "text", "label", "p", "top": [{"id", "label", "p"}]}} per step,
                          then {"done": "length" | "eos" | "stopped"} (or {"error": one line})
    POST /api/stop        {"id"}: end that generation (it answers {"done": "stopped"}; beam search,
                          which runs as one call, ends only when it is done)
    POST /api/attention   {"tokens": [ids], "query": i} -> attention from token i to tokens up to it
    POST /api/classify    {"text"} -> {"label", "labels", "probabilities"} (a classifier checkpoint)

Safe by default: it listens on 127.0.0.1 unless --host says otherwise (then a warning
line). Prompt length, new tokens, beams, request size and concurrent generations are
bounded (a request past a bound gets a 4xx that says which). A client that disconnects
stops its generation. The server reads the checkpoint it was started with and nothing
else, and writes no file. Standard library only (http.server): one page and a few JSON
calls need no web framework.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import sys
import threading
import traceback
import uuid
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Iterator

import torch

from gpt.checkpoint import add_model_options, checkpoint_path, load_checkpoint, load_language_model, load_model
from gpt.classify import is_regression, predict
from gpt.errors import ArgumentParser, UserError, exit_on_user_error
from gpt.inspect import token_label
from gpt.sampling import SamplingConfig, generate, steps
from gpt.system import autocast, pick_device, pick_dtype
from gpt.tokenizer import Tokenizer

# the settings each method reads (the rest of a request's settings are left out)
METHODS = {
    "greedy": ("repetition_penalty",),
    "sample": ("temperature", "top_k", "top_p", "min_p", "repetition_penalty"),
    "contrastive": ("penalty_alpha", "top_k", "repetition_penalty"),
    "beam": ("num_beams", "length_penalty", "early_stopping", "repetition_penalty"),
}
SAMPLE_PY_DEFAULTS = {"temperature": 0.8}  # sample.py's, where they differ from SamplingConfig's
TOP = 10  # alternatives shown per token
MAP = 48  # positions of the small attention maps


@dataclass
class Limits:
    prompt_tokens: int = 2048
    new_tokens: int = 1000
    beams: int = 8
    generations: int = 2  # at once
    attention_tokens: int = 1024
    body_bytes: int = 1 << 20


class RequestError(Exception):
    """A bad request: its HTTP status and one line that says what to change."""

    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


class Pieces:
    """The text each new token adds, so that the pieces add up to the decoded text: a token
    that ends in the middle of a UTF-8 character adds nothing until the character is whole."""

    def __init__(self, tok: Tokenizer):
        self.tok, self.tokens, self.shown = tok, [], ""

    def add(self, token: int) -> str:
        self.tokens.append(token)
        if token == self.tok.eot_token:
            return ""
        text = self.tok.decode([t for t in self.tokens if t != self.tok.eot_token])
        text = text[:-1] if text.endswith("\ufffd") else text
        piece, self.shown = text[len(self.shown):], text
        return piece


class Server:
    """The model and what it serves: every model call holds `lock` (generations take turns
    step by step; a generation holds one of `slots` from start to end)."""

    def __init__(self, model: torch.nn.Module, tok: Tokenizer, device: torch.device, dtype: torch.dtype,
                 limits: Limits, labels: list[str] | None = None, ckpt: dict | None = None, name: str = ""):
        self.model, self.tok, self.device, self.dtype, self.limits = model, tok, device, dtype, limits
        self.labels, self.ckpt, self.name = labels, ckpt, name
        self.lock = threading.Lock()
        self.slots = threading.BoundedSemaphore(limits.generations)
        self.running: dict[str, threading.Event] = {}
        self.page = resources.files("gpt").joinpath("assets/serve.html").read_bytes()

    # ---- what the page asks -------------------------------------------------------------------

    def info(self) -> dict:
        info = {"name": self.name, "kind": "classifier" if self.labels else "lm", "tokenizer": self.tok.name,
                "limits": dataclasses.asdict(self.limits)}
        if self.labels:
            return {**info, "labels": self.labels}
        config = self.model.config
        settings = [{"name": f.name, "default": SAMPLE_PY_DEFAULTS.get(f.name, f.default),
                     "type": f.metadata["type"].__name__, "help": f.metadata["help"]}
                    for f in dataclasses.fields(SamplingConfig)]
        return {**info, "layers": config.n_layer, "heads": config.attention_heads, "block_size": config.block_size,
                "context": self.model.max_context(), "methods": METHODS, "settings": settings,
                "default_seed": 1337, "default_max_new_tokens": 200}

    def sampling(self, request: dict) -> tuple[SamplingConfig, int, int, list[int]]:
        """(settings, max_new_tokens, seed, prompt ids) from a generation request, or a RequestError."""
        known = {"prompt", "method", "max_new_tokens", "seed"} | {f.name for f in dataclasses.fields(SamplingConfig)}
        unknown = sorted(set(request) - known)
        if unknown:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"unknown field(s) {', '.join(unknown)}: the fields are "
                                                       f"{', '.join(sorted(known))}")
        method = request.get("method", "sample")
        if not isinstance(method, str) or method not in METHODS:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"unknown method {method!r}: use one of {', '.join(METHODS)}")
        prompt = request.get("prompt", "")
        if not isinstance(prompt, str):
            raise RequestError(HTTPStatus.BAD_REQUEST, "prompt must be a string")
        n = request.get("max_new_tokens", 200)
        seed = request.get("seed", 1337)
        for name, value in (("max_new_tokens", n), ("seed", seed)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise RequestError(HTTPStatus.BAD_REQUEST, f"{name} must be a whole number, got {value!r}")
        if not 0 <= seed < 2**63:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"seed must be from 0 to 2**63 - 1, got {seed}")
        if not 1 <= n <= self.limits.new_tokens:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"max_new_tokens must be from 1 to {self.limits.new_tokens} "
                                                       f"(the server's --max_new_tokens), got {n}")
        settings = {k: request[k] for k in METHODS[method] if request.get(k) is not None}
        if method == "greedy":
            settings["temperature"] = 0.0
        if method == "sample":
            settings.setdefault("temperature", SAMPLE_PY_DEFAULTS["temperature"])
        if method == "beam" and not 2 <= settings.get("num_beams", 0) <= self.limits.beams:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"beam search needs num_beams from 2 to {self.limits.beams}, "
                                                       f"got {settings.get('num_beams')}")
        if method == "contrastive" and (settings.get("penalty_alpha") is None or (settings.get("top_k") or 0) < 2):
            raise RequestError(HTTPStatus.BAD_REQUEST, "contrastive search needs penalty_alpha and top_k >= 2")
        for name, value in settings.items():
            kind = next(f.metadata["type"] for f in dataclasses.fields(SamplingConfig) if f.name == name)
            if kind is int and (not isinstance(value, int) or isinstance(value, bool)):
                raise RequestError(HTTPStatus.BAD_REQUEST, f"{name} must be a whole number, got {value!r}")
            if kind is float and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                  or not -1e6 < value < 1e6):
                raise RequestError(HTTPStatus.BAD_REQUEST, f"{name} must be a number between -1e6 and 1e6, "
                                                           f"got {value!r}")
        if abs(settings.get("length_penalty", 0)) > 10:
            raise RequestError(HTTPStatus.BAD_REQUEST, "length_penalty must be from -10 to 10")
        if method == "contrastive" and settings["top_k"] > 64:
            raise RequestError(HTTPStatus.BAD_REQUEST, "contrastive search takes top_k up to 64 here")
        if 0 < settings.get("temperature", 1.0) < 1e-3:
            raise RequestError(HTTPStatus.BAD_REQUEST, "temperature must be 0 (greedy) or at least 0.001")
        try:
            sampling = SamplingConfig(**settings)
        except UserError as e:
            raise RequestError(HTTPStatus.BAD_REQUEST, str(e)) from None
        ids = self.tok.encode(prompt) if prompt else [self.tok.eot_token]  # as sample.py does
        if len(ids) > self.limits.prompt_tokens:
            raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               f"the prompt is {len(ids):,} tokens; the limit is {self.limits.prompt_tokens:,} "
                               f"(the server's --max_prompt_tokens): shorten it")
        return sampling, n, seed, ids

    def token(self, pieces: Pieces, token: int, probs: torch.Tensor | None) -> dict:
        """One token as the page shows it: its text, a readable label, its probability and the
        likeliest alternatives (probs: the step's distribution, None when there is none)."""
        row = {"id": token, "text": pieces.add(token), "label": token_label(self.tok, token), "p": None, "top": []}
        if probs is not None:
            p, ids = torch.topk(probs, min(TOP, probs.numel()))
            row["p"] = float(probs[token])
            row["top"] = [{"id": int(i), "label": token_label(self.tok, int(i)), "p": float(q)}
                          for q, i in zip(p.tolist(), ids.tolist())]
        return row

    def generate(self, request: dict) -> tuple[str, Iterator[dict]]:
        """(its id, a generation's events, one per line of the response: see the module's
        notes). The request is checked first. A generation holds a slot until `finish(id)`;
        closing the events before that stops it (no step runs after)."""
        if self.labels:
            raise RequestError(HTTPStatus.BAD_REQUEST, "this is a classifier: ask /api/classify")
        sampling, n, seed, ids = self.sampling(request)
        if not self.slots.acquire(blocking=False):
            raise RequestError(HTTPStatus.TOO_MANY_REQUESTS,
                               f"{self.limits.generations} generations are running (the server's --max_generations): "
                               f"stop one or wait for it to end")
        gid, stop = uuid.uuid4().hex, threading.Event()
        self.running[gid] = stop
        return gid, self._events(gid, stop, sampling, n, seed, ids)

    def finish(self, gid: str) -> None:
        """Give a generation's slot back (once)."""
        if self.running.pop(gid, None) is not None:
            self.slots.release()

    def _events(self, gid: str, stop: threading.Event, sampling: SamplingConfig, n: int, seed: int,
                ids: list[int]) -> Iterator[dict]:
        pieces = Pieces(self.tok)
        yield {"id": gid, "prompt": [self.token(pieces, t, None) for t in ids]}
        idx = torch.tensor([ids], device=self.device)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        settings = dict(eos_token_id=self.tok.eot_token, generator=generator)
        if sampling.num_beams > 1:
            yield from self._beams(idx, sampling, n, settings, pieces)
            return
        chosen = steps(self.model, idx, n, sampling, **settings)  # runs nothing until the first next()
        for _ in range(n):
            if stop.is_set():
                yield {"done": "stopped"}
                return
            with self.lock, autocast(self.device, self.dtype):
                step = next(chosen)
                token = int(step.tokens[0])
                row = self.token(pieces, token, torch.softmax(step.scores[0].float(), dim=-1))
            yield {"token": row}
            if token == self.tok.eot_token:
                yield {"done": "eos"}
                return
        yield {"done": "length"}

    def _beams(self, idx: torch.Tensor, sampling: SamplingConfig, n: int, settings: dict, pieces: Pieces):
        """Beam search: its text at the end, each token with the model's own probabilities."""
        with self.lock, autocast(self.device, self.dtype), torch.no_grad():
            out = generate(self.model, idx, n, sampling, **settings)[0]
            logits = self.model.logits(self.model.hidden_states(out[None, -self.window():]))[0].float()
        probs = torch.softmax(logits, dim=-1)
        new = out[idx.size(1):].tolist()
        offset = probs.size(0) - len(new) - 1  # the row whose next token is new[0]
        for i, token in enumerate(new):
            yield {"token": self.token(pieces, token, probs[offset + i] if offset + i >= 0 else None)}
        yield {"done": "eos" if new[-1] == self.tok.eot_token else "length"}

    def window(self) -> int:
        """How many of the last tokens one forward reads: the model's context, within the limit."""
        return min(self.model.max_context() or self.limits.attention_tokens, self.limits.attention_tokens)

    def stop(self, request: dict) -> dict:
        event = self.running.get(request.get("id")) if isinstance(request.get("id"), str) else None
        if event is None:
            raise RequestError(HTTPStatus.NOT_FOUND, f"no generation {request.get('id')!r} is running")
        event.set()
        return {"stopping": request["id"]}

    def attention(self, request: dict) -> dict:
        """Attention from token `query` to the tokens before it, every layer and head: its row
        (L, H, keys), each head's entropy (nats) and the last MAP positions' maps (uint8 in
        base64: 255 x probability, row-major (L, H, MAP, MAP))."""
        if self.labels:
            raise RequestError(HTTPStatus.BAD_REQUEST, "this is a classifier: it has no generation to look into")
        tokens, query = request.get("tokens"), request.get("query")
        vocab = self.model.config.vocab_size
        if not isinstance(tokens, list) or not tokens or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in tokens):
            raise RequestError(HTTPStatus.BAD_REQUEST, f"tokens must be a non-empty list of ids from 0 to {vocab - 1}")
        if len(tokens) > self.limits.prompt_tokens + self.limits.new_tokens:
            raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"{len(tokens):,} tokens: the limit is "
                                                                     f"{self.limits.prompt_tokens + self.limits.new_tokens:,}")
        query = len(tokens) - 1 if query is None else query
        if not isinstance(query, int) or isinstance(query, bool) or not 0 <= query < len(tokens):
            raise RequestError(HTTPStatus.BAD_REQUEST, f"query must be a token's index, 0 to {len(tokens) - 1}")
        start = max(0, query + 1 - self.window())
        with self.lock, torch.no_grad():
            probs = self.model.attention_probabilities(torch.tensor([tokens[start: query + 1]], device=self.device))
        probs = probs[:, 0].float().cpu()  # (L, H, T, T)
        row = probs[:, :, -1, :]  # (L, H, T): the query's
        entropy = -(row * row.clamp(min=1e-12).log()).sum(-1)
        maps = (probs[:, :, -MAP:, -MAP:] * 255).round().to(torch.uint8).contiguous()
        return {"start": start, "query": query, "layers": probs.size(0), "heads": probs.size(1),
                "rows": [[[round(v, 5) for v in head] for head in layer] for layer in row.tolist()],
                "entropy": [[round(v, 4) for v in layer] for layer in entropy.tolist()],
                "map_size": maps.size(-1), "maps": base64.b64encode(maps.numpy().tobytes()).decode()}

    def classify(self, request: dict) -> dict:
        if not self.labels:
            raise RequestError(HTTPStatus.BAD_REQUEST, "this is a language model: ask /api/generate")
        text = request.get("text")
        if not isinstance(text, str) or not text.strip():
            raise RequestError(HTTPStatus.BAD_REQUEST, "text must be a non-empty string")
        if len(self.tok.encode(text)) > self.limits.prompt_tokens:
            raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the text is longer than "
                                                                     f"{self.limits.prompt_tokens:,} tokens")
        with self.lock:
            result = predict(self.model, self.tok, self.ckpt, [text], self.device)[0]
        return {"label": result["label"], "labels": self.labels,
                "probabilities": [result["probabilities"][k] for k in self.labels]}


# ---- HTTP ------------------------------------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    server_version = "gpt.serve"
    protocol_version = "HTTP/1.0"  # one request per connection: a streamed answer ends when it closes
    timeout = 60  # seconds a client may keep the server waiting (a slow body, a stream it stopped reading)
    routes = {"/api/generate": "generate", "/api/stop": "stop", "/api/attention": "attention",
              "/api/classify": "classify"}

    @property
    def app(self) -> Server:
        return self.server.app

    def log_message(self, format, *args):  # quiet: the terminal shows the URL and errors only
        pass

    def send(self, status: HTTPStatus, body: bytes, kind: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def send_json(self, status: HTTPStatus, obj: dict) -> None:
        self.send(status, json.dumps(obj).encode())

    def do_GET(self):
        if self.path in ("/", "/index.html"):
            self.send(HTTPStatus.OK, self.app.page, "text/html; charset=utf-8")
        elif self.path == "/api/info":
            self.send_json(HTTPStatus.OK, self.app.info())
        else:
            self.send_json(HTTPStatus.NOT_FOUND, {"error": f"no page {self.path}: the page is /"})

    def do_POST(self):
        try:
            action = self.routes.get(self.path)
            if action is None:
                raise RequestError(HTTPStatus.NOT_FOUND, f"no API {self.path}: POST to {', '.join(self.routes)}")
            length = self.headers.get("Content-Length") or "0"
            if not (length.isascii() and length.isdigit() and len(length) <= 12):
                raise RequestError(HTTPStatus.BAD_REQUEST, f"Content-Length must be a whole number, got {length!r}")
            length = int(length)
            if length > self.app.limits.body_bytes:
                raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                   f"the request is {length:,} bytes; the limit is {self.app.limits.body_bytes:,}")
            try:
                request = json.loads(self.rfile.read(length) or b"{}")
            except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                raise RequestError(HTTPStatus.BAD_REQUEST, f"the body is not JSON: {e}") from None
            if not isinstance(request, dict):
                raise RequestError(HTTPStatus.BAD_REQUEST, "the body must be a JSON object")
            answer = getattr(self.app, action)(request)
        except RequestError as e:
            self.send_json(e.status, {"error": str(e)})
            return
        except UserError as e:  # e.g. a character the model's vocabulary lacks
            self.send_json(HTTPStatus.BAD_REQUEST, {"error": str(e)})
            return
        except Exception as e:  # a bug: say so, keep serving
            traceback.print_exc()
            self.send_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error: {type(e).__name__}: {e}"})
            return
        if action == "generate":
            self.stream(*answer)
        else:
            self.send_json(HTTPStatus.OK, answer)

    def stream(self, gid: str, events: Iterator[dict]) -> None:
        """One JSON object per line, each sent as it comes; a reader that went away ends it."""
        try:
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "application/x-ndjson")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            try:
                for event in events:
                    self.wfile.write(json.dumps(event).encode() + b"\n")
                    self.wfile.flush()
            except UserError as e:  # found once generating (a KV cache larger than the free memory): the last line
                self.wfile.write(json.dumps({"error": str(e)}).encode() + b"\n")
            except (OSError, ConnectionError):
                raise
            except Exception as e:  # a bug: the page says so instead of waiting
                traceback.print_exc()
                self.wfile.write(json.dumps({"error": f"internal error: {type(e).__name__}: {e}"}).encode() + b"\n")
        except (OSError, ConnectionError):
            pass  # the page was closed or the request cancelled
        finally:
            events.close()  # no further step runs
            self.app.finish(gid)


def make_server(app: Server, host: str, port: int) -> ThreadingHTTPServer:
    """The HTTP server (not yet serving: call serve_forever); port 0 takes a free port."""
    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as e:
        if e.errno in (98, 48, 10048):  # EADDRINUSE on Linux, macOS, Windows
            raise UserError(f"port {port} on {host} is in use: pick another with --port") from None
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    server.daemon_threads = True
    server.app = app
    return server


def load_server(args, device: torch.device, dtype: torch.dtype, limits: Limits) -> Server:
    """A Server for the model named by the options: a language model, or a classifier checkpoint."""
    out_dir = args.out_dir or (None if args.init_from else args.model_defaults["out_dir"])
    if not args.init_from and out_dir:
        path = checkpoint_path(out_dir, args.ckpt or args.model_defaults["ckpt"])
        found = load_checkpoint(path)
        task = found.get("task", "lm")
        if task == "classify" and not is_regression(found):
            del found  # load_model reads it again, onto the device
            model, tok, ckpt = load_model(path, task="classify", device=device)
            return Server(model, tok, device, dtype, limits, labels=ckpt["labels"], ckpt=ckpt, name=str(path))
        if task != "lm":
            raise UserError(f"{path} is a {task} model: the page shows language models and single-text "
                            f"classifiers of labels; predict with it: python -m gpt.classify --out_dir={out_dir} "
                            f"--input=FILE")
    model, tok, _, _ = load_language_model(args, device)
    return Server(model, tok, device, dtype, limits, name=args.init_from or str(path))


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="python -m gpt.serve", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    add_model_options(p, ckpt_default="ckpt.pt", out_dir_default="out/shakespeare_char")
    p.add_argument("--host", default="127.0.0.1", help="where to listen (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    defaults = Limits()
    p.add_argument("--max_prompt_tokens", type=int, default=defaults.prompt_tokens)
    p.add_argument("--max_new_tokens", type=int, default=defaults.new_tokens, help="the most one request may ask for")
    p.add_argument("--max_generations", type=int, default=defaults.generations, help="generations running at once")
    args = p.parse_args(argv)
    for name in ("max_prompt_tokens", "max_new_tokens", "max_generations"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if not 0 <= args.port < 65536:
        raise UserError(f"--port must be from 0 to 65535, got {args.port}")
    limits = Limits(prompt_tokens=args.max_prompt_tokens, new_tokens=args.max_new_tokens,
                    generations=args.max_generations)
    device = pick_device(args.device)
    app = load_server(args, device, pick_dtype(args.dtype, device), limits)
    server = make_server(app, args.host, args.port)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host}: anyone who can reach this machine can use the model",
              file=sys.stderr)
    host, port = server.server_address[:2]
    print(f"serving {app.name} at http://{'localhost' if host == '127.0.0.1' else host}:{port}/ (Ctrl-C stops)",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
