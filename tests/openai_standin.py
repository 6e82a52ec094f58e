"""A stand-in for a teacher LLM behind an OpenAI-compatible endpoint (what `vllm serve` offers): a real HTTP server on
127.0.0.1 whose replies come from a script, for the teacher tests and the README walk."""
from __future__ import annotations

import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

GOOD = {"question": "Which side is the opacity on?", "choices": ["left", "right"], "answer": "left"}


class ScriptedServer:
    """An OpenAI-compatible /v1/chat/completions on 127.0.0.1. ``script(user_text, n)`` -> the reply content for the
    n-th request (0-based) carrying that prompt, or ("sleep", seconds) to stall past the client's timeout."""

    def __init__(self, script):
        self.script, self.bodies, self.per_prompt, self.agents = script, [], Counter(), []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = json.loads(body)
                user = next(m["content"] for m in request["messages"] if m["role"] == "user")
                with server._lock:
                    server.bodies.append(body.decode())
                    server.agents.append(self.headers.get("User-Agent", ""))
                    n = server.per_prompt[user]
                    server.per_prompt[user] += 1
                action = server.script(user, n)
                if isinstance(action, tuple) and action[0] == "sleep":
                    time.sleep(action[1])
                    action = json.dumps(GOOD)
                payload = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": request["model"],
                                      "choices": [{"index": 0, "finish_reason": "stop",
                                                   "message": {"role": "assistant", "content": action}}],
                                      "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (the timeout case)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
