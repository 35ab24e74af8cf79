"""Text answers to text prompts from a teacher, cached line by line: a local model (`Local`) or a
black-box teacher behind an OpenAI-compatible `chat/completions` endpoint (`Endpoint`). Both have
`answers(requests, cache, max_tokens, temperature, top_p, seed)` (class `Teacher`: the cache).

An endpoint gives no logits, only text, so it feeds sequence-level distillation: prompts go
out concurrently (at most `concurrency` in flight), failures that may pass (429, 5xx, timeouts,
dropped connections, malformed JSON) are retried with exponential back-off (honouring
Retry-After), and every answer is appended to a JSON-lines cache the moment it arrives, so a
crash or Ctrl-C loses nothing and a rerun asks only for what is missing. The API key is read
from the environment variable the recipe names, at request time; it is never stored or printed.
"""

from __future__ import annotations

import asyncio
import json
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from . import UserError
from .progress import Bar
from .seeds import answer_seed


@dataclass(frozen=True)
class Request:
    """One answer to get: prompt `index`, sample `sample` of it."""

    index: int
    sample: int
    prompt: str


class Teacher(ABC):
    """The cache every answering teacher shares; a subclass only fetches what is missing,
    handing each answer to `emit` as it arrives."""

    def answers(
        self, requests: list[Request], cache: Path, max_tokens: int, temperature: float, top_p: float, seed: int
    ) -> dict[tuple[int, int], str]:
        """{(index, sample): text} for every request, from the cache or the teacher."""
        done = read_cache(cache)
        todo = [r for r in requests if (r.index, r.sample) not in done]
        if todo:
            cache.parent.mkdir(parents=True, exist_ok=True)
            with open(cache, "a", encoding="utf-8") as f, Bar("teacher answers", len(requests), unit="answer") as bar:
                bar.update(len(requests) - len(todo))

                def emit(req: Request, text: str) -> None:
                    f.write(json.dumps({"index": req.index, "sample": req.sample, "text": text}) + "\n")
                    f.flush()
                    os.fsync(f.fileno())  # on disk before the next answer is awaited
                    done[(req.index, req.sample)] = text
                    bar.update(1)

                self.fetch(todo, emit, max_tokens, temperature, top_p, seed)
        return {(r.index, r.sample): done[(r.index, r.sample)] for r in requests}

    @abstractmethod
    def fetch(self, todo: list[Request], emit, max_tokens: int, temperature: float, top_p: float, seed: int) -> None:
        """Get an answer for every request in `todo`, calling `emit(request, text)` as each arrives."""


class Local(Teacher):
    """A local teacher answering by continuing each prompt (sampling when temperature > 0)."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def fetch(self, todo, emit, max_tokens, temperature, top_p, seed) -> None:
        import torch

        groups: dict[int, list[Request]] = {}
        for r in todo:
            groups.setdefault(r.index, []).append(r)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
        for index, group in groups.items():
            torch.manual_seed(answer_seed(seed, index))
            ids = self.tokenizer(group[0].prompt, return_tensors="pt").input_ids.to(self.model.device)
            with torch.no_grad():
                out = self.model.generate(
                    ids.repeat(len(group), 1),
                    attention_mask=torch.ones_like(ids).repeat(len(group), 1),
                    max_new_tokens=max_tokens,
                    pad_token_id=self.tokenizer.eos_token_id,
                    **(sampling if temperature > 0 else {"do_sample": False}),
                )
            for req, row in zip(group, out[:, ids.shape[1] :]):
                emit(req, self.tokenizer.decode(row, skip_special_tokens=True))


class Endpoint(Teacher):
    """`openai:<base_url>#<model>` with its client settings (a models.TeacherSpec)."""

    def __init__(self, spec):
        url, _, self.model = spec.target.partition("#")
        self.url = url.rstrip("/")
        self.spec = spec

    def _headers(self) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.spec.api_key_env:
            key = os.environ.get(self.spec.api_key_env)
            if not key:
                raise UserError(f"teacher.api_key_env: environment variable {self.spec.api_key_env} is not set")
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _timeout(self):
        import aiohttp

        return aiohttp.ClientTimeout(total=self.spec.timeout_s)

    # --- before any work -------------------------------------------------------------------

    def check(self) -> None:
        """Reachable, key accepted, model served: one line and exit 2 otherwise."""
        asyncio.run(self._check())

    async def _check(self) -> None:
        import aiohttp

        where = f"teacher {self.url}"
        try:
            async with aiohttp.ClientSession(timeout=self._timeout()) as session:
                async with session.get(f"{self.url}/models", headers=self._headers()) as r:
                    body = await r.text()
                    if r.status in (401, 403):
                        raise UserError(f"{where}: the API key was refused (HTTP {r.status})")
                    if r.status == 200:
                        served = [m.get("id") for m in _json(body).get("data", []) if isinstance(m, dict)]
                        if self.model not in served:
                            raise UserError(f"{where}: model {self.model!r} is not served; it serves {served}")
                        return
                # no model list: ask for one token instead
                async with session.post(
                    f"{self.url}/chat/completions", json=self._payload("Hi", 1, 0.0, 1.0, 0), headers=self._headers()
                ) as r:
                    body = await r.text()
                    if r.status != 200:
                        raise UserError(f"{where}: model {self.model!r} refused: HTTP {r.status} {_short(body)}")
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise UserError(f"{where}: unreachable ({type(exc).__name__}: {_short(str(exc))})") from None
        except ValueError:
            raise UserError(f"{where}: the model list is not JSON") from None

    # --- answers -----------------------------------------------------------------------------

    def _payload(self, prompt: str, max_tokens: int, temperature: float, top_p: float, seed: int) -> dict:
        return {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "seed": seed,
        }

    def fetch(self, todo, emit, max_tokens, temperature, top_p, seed) -> None:
        asyncio.run(self._fetch(todo, emit, max_tokens, temperature, top_p, seed))

    async def _fetch(self, todo, emit, max_tokens, temperature, top_p, seed) -> None:
        import aiohttp

        gate = asyncio.Semaphore(self.spec.concurrency)
        headers = self._headers()
        async with aiohttp.ClientSession(timeout=self._timeout()) as session:

            async def one(req: Request) -> tuple[Request, str]:
                request_seed = answer_seed(seed, req.index, req.sample)
                payload = self._payload(req.prompt, max_tokens, temperature, top_p, request_seed)
                return req, await self._post(session, gate, payload, headers)

            tasks = [asyncio.ensure_future(one(r)) for r in todo]
            try:
                for next_done in asyncio.as_completed(tasks):
                    emit(*await next_done)
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _post(self, session, gate: asyncio.Semaphore, payload: dict, headers: dict) -> str:
        import aiohttp

        reason, tries = "", self.spec.max_retries + 1
        for attempt in range(tries):
            wait = None
            try:
                async with gate, session.post(f"{self.url}/chat/completions", json=payload, headers=headers) as r:
                    body = await r.text()
                    if r.status == 200:
                        return _content(body)
                    if r.status != 429 and r.status < 500:
                        raise UserError(f"teacher {self.url}: HTTP {r.status} {_short(body)}", code=1)
                    reason = f"HTTP {r.status}"
                    wait = _seconds(r.headers.get("Retry-After"))
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
                reason = "timed out" if isinstance(exc, asyncio.TimeoutError) else f"{type(exc).__name__}: {exc}"
            if attempt + 1 < tries:
                await asyncio.sleep(wait if wait is not None else self.spec.backoff_s * 2**attempt)
        raise UserError(
            f"teacher {self.url}: a request failed {tries} times (last: {_short(reason)}); "
            "the answers so far are cached, rerun to go on",
            code=1,
        )


def read_cache(path: Path) -> dict[tuple[int, int], str]:
    """Answers cached so far; a line cut short by a crash is ignored."""
    done: dict[tuple[int, int], str] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                done[(int(row["index"]), int(row["sample"]))] = str(row["text"])
            except (ValueError, KeyError, TypeError):
                continue
    return done


def _json(body: str) -> dict:
    value = json.loads(body)
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def _content(body: str) -> str:
    """The first choice's message text; anything else is a malformed answer (retried)."""
    try:
        content = _json(body)["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError) as exc:
        raise ValueError(f"malformed answer ({type(exc).__name__})") from None
    if not isinstance(content, str):
        raise ValueError("malformed answer (content is not text)")
    return content


def _seconds(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _short(text: str, n: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"
