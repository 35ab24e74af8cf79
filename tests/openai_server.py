"""A real OpenAI-compatible HTTP server on 127.0.0.1 for the tests (stdlib http.server, in a
thread): `GET /v1/models` and `POST /v1/chat/completions`, answering with a local model or a
scripted function, with failures injected on demand."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch


def model_answers(model, tokenizer):
    """Continue the user message with a local model (greedy at temperature 0, else seeded sampling)."""
    lock = threading.Lock()

    def answer(prompt: str, max_tokens: int, temperature: float, seed: int) -> str:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0} if temperature > 0 else {}
        with lock, torch.no_grad():
            torch.manual_seed(seed)
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, pad_token_id=0, **sampling
            )
        return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

    return answer


class Server:
    """`with Server(answer, key="k") as s:` serves at `s.url`; `s.failures` is consumed one per
    chat request: "429", "500", "timeout" (sleeps `stall_s`), "malformed", "drop"."""

    def __init__(self, answer, model: str = "tiny", key: str | None = None, stall_s: float = 2.0):
        self.answer, self.model, self.key, self.stall_s = answer, model, key, stall_s
        self.failures: list[str] = []
        self.chat_requests = 0
        self.auth_headers: list[str] = []
        self._lock = threading.Lock()

    def __enter__(self) -> "Server":
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, body: str, headers: dict | None = None):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body.encode())))
                self.end_headers()
                self.wfile.write(body.encode())

            def _authorized(self) -> bool:
                given = self.headers.get("Authorization", "")
                server.auth_headers.append(given)
                if server.key is not None and given != f"Bearer {server.key}":
                    self._send(401, json.dumps({"error": {"message": "invalid api key"}}))
                    return False
                return True

            def do_GET(self):
                if self.path != "/v1/models":
                    return self._send(404, "{}")
                if self._authorized():
                    self._send(200, json.dumps({"object": "list", "data": [{"id": server.model, "object": "model"}]}))

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if self.path != "/v1/chat/completions" or not self._authorized():
                    return None if self.path == "/v1/chat/completions" else self._send(404, "{}")
                if body.get("model") != server.model:
                    return self._send(404, json.dumps({"error": {"message": f"model {body.get('model')} not found"}}))
                with server._lock:
                    server.chat_requests += 1
                    failure = server.failures.pop(0) if server.failures else None
                if failure == "429":
                    return self._send(429, json.dumps({"error": {"message": "slow down"}}), {"Retry-After": "0"})
                if failure == "500":
                    return self._send(500, json.dumps({"error": {"message": "oops"}}))
                if failure == "malformed":
                    return self._send(200, '{"choices": [{"message": ')
                if failure == "drop":
                    self.close_connection = True
                    return None
                if failure == "timeout":
                    time.sleep(server.stall_s)
                prompt = body["messages"][-1]["content"]
                text = server.answer(
                    prompt, body.get("max_tokens", 16), body.get("temperature", 1.0), body.get("seed", 0)
                )
                message = {"role": "assistant", "content": text}
                self._send(200, json.dumps({"choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}))

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()
