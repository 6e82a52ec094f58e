"""The two teacher LLM backends behind one small protocol: an OpenAI-compatible endpoint the user runs (vLLM, llama.cpp
server, ...) through the official ``openai`` client, and a local transformers causal LM (greedy, chat template).

A backend only turns chat messages into reply text, raising ``TeacherRetryable`` for a failure worth another try
(timeout, lost connection, a 5xx or 429) and ``TeacherError`` for one that no retry fixes (wrong model name, bad
key). Retries, parsing and counting live in ``mmdomain.teacher``.
"""
from __future__ import annotations

import os
import threading
from typing import Any, Protocol

from .errors import MmdomainError


class TeacherError(MmdomainError, RuntimeError):
    """A teacher that cannot answer at all (unreachable model, rejected key); the message says what to fix."""


class TeacherRetryable(Exception):
    """One failed request that another attempt may fix; ``reason`` is the reject reason counted if none does."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class TeacherBackend(Protocol):
    """What ``mmdomain.teacher`` needs from a teacher LLM."""

    teacher_id: str   # "openai" or "transformers": in provenance and the cache key
    model: str        # the served model name, or the local directory
    deterministic: bool  # True when the same prompt always gives the same reply: a bad reply is not retried

    def complete(self, messages: list[dict[str, str]], *, seed: int) -> str: ...


class OpenAITeacher:
    """An OpenAI-compatible chat completions endpoint, e.g. ``vllm serve MODEL`` at http://127.0.0.1:8000/v1.

    The client's own retries are off (``max_retries=0``) so that every attempt goes through, and is counted by,
    the retry budget of ``mmdomain.teacher``. The key is read from the environment variable ``api_key_env``; a
    local server that checks none gets the placeholder "EMPTY"."""

    teacher_id = "openai"
    deterministic = False  # sampling servers may answer differently on a retry (the seed changes per attempt)

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY", timeout: float = 60.0,
                 temperature: float = 0.2, max_tokens: int = 1024) -> None:
        try:
            import openai
        except ModuleNotFoundError as exc:
            raise TeacherError("the OpenAI-compatible teacher needs the openai client: pip install 'mmdomain[teacher]'") from exc
        self._openai = openai
        self.base_url, self.model, self.temperature, self.max_tokens = base_url, model, temperature, max_tokens
        self._client = openai.OpenAI(base_url=base_url, api_key=os.environ.get(api_key_env) or "EMPTY",
                                     timeout=timeout, max_retries=0)

    def complete(self, messages: list[dict[str, str]], *, seed: int) -> str:
        openai = self._openai
        try:
            response = self._client.chat.completions.create(model=self.model, messages=messages, seed=seed,
                                                            temperature=self.temperature, max_tokens=self.max_tokens)
        except openai.APITimeoutError as exc:  # before APIConnectionError: it is a subclass
            raise TeacherRetryable("timeout", str(exc)) from exc
        except openai.APIConnectionError as exc:
            raise TeacherRetryable("connection", f"{self.base_url}: {exc}") from exc
        except openai.APIStatusError as exc:
            if exc.status_code == 429 or exc.status_code >= 500:
                raise TeacherRetryable("server_error", f"HTTP {exc.status_code}") from exc
            hint = {401: "check the key in the environment variable given by --api-key-env",
                    404: "check --model (the name the server serves) and --teacher (the endpoint's base URL, usually ending in /v1)"}
            raise TeacherError(f"teacher at {self.base_url} refused the request for model {self.model!r}: HTTP {exc.status_code} "
                               f"({hint.get(exc.status_code, exc.message)})") from exc
        if not response.choices:
            return ""
        return response.choices[0].message.content or ""


class TransformersTeacher:
    """A local transformers causal LM (a directory, never a hub id: mmdomain never downloads) answering greedily
    through its chat template. One model instance: concurrent calls are serialised."""

    teacher_id = "transformers"
    deterministic = True

    def __init__(self, path: str, *, max_new_tokens: int = 512, device: str = "cpu") -> None:
        from .llm import check_local_dir

        self.model = str(check_local_dir(path, "teacher model"))
        self.max_new_tokens, self.device = max_new_tokens, device
        self._loaded: tuple[Any, Any] | None = None
        self._lock = threading.Lock()

    def _load(self) -> tuple[Any, Any]:
        # Loaded on first use, so building a teacher (and validating options) costs nothing.
        if self._loaded is None:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self.model, local_files_only=True)
            if not getattr(tokenizer, "chat_template", None):
                raise TeacherError(f"teacher model {self.model!r} has no chat template; use an instruction-tuned model "
                                   "(its tokenizer_config.json holds chat_template)")
            model = AutoModelForCausalLM.from_pretrained(self.model, local_files_only=True).to(self.device).eval()
            self._loaded = (tokenizer, model)
        return self._loaded

    def complete(self, messages: list[dict[str, str]], *, seed: int) -> str:
        import torch

        with self._lock:
            tokenizer, model = self._load()
            prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(self.device)
            with torch.no_grad():
                # Only ids and mask: some tokenizers add token_type_ids, which causal LMs' generate refuses.
                out = model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], do_sample=False,
                                     max_new_tokens=self.max_new_tokens,
                                     pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
            return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
