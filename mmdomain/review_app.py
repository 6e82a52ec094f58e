"""The review page's web server (FastAPI on uvicorn, the optional extra ``serve``): bound to 127.0.0.1 only, one page
with its CSS and JavaScript inline (no external asset, works offline), a small JSON API, and the current item's media.

A page served here can only talk to this server: requests must name 127.0.0.1 or localhost as their host (a page
elsewhere cannot reach it through DNS rebinding), judgements carry a token that only the served page knows (a page
elsewhere cannot post them), and the page's content security policy lets it load nothing from anywhere else.
"""
import html
import logging
import secrets
import signal
import socket
import threading
from contextlib import contextmanager
from importlib import resources
from typing import Any, Iterator, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from .review_session import ReviewSession
from .review_store import ReviewError

log = logging.getLogger(__name__)

HOST = "127.0.0.1"


# (No `from __future__ import annotations` here: FastAPI reads these annotations at run time.)
class Judgement(BaseModel):
    model_config = ConfigDict(extra="forbid")
    item: str
    decision: Literal["1", "2", "flag"]
    edited: Optional[str] = Field(None, max_length=20_000)
    note: Optional[str] = Field(None, max_length=2_000)


class Skip(BaseModel):
    model_config = ConfigDict(extra="forbid")
    item: str


def page_html(token: str, nonce: str, title: str) -> str:
    page = resources.files("mmdomain").joinpath("templates/review.html").read_text(encoding="utf-8")
    return page.replace("__TOKEN__", token).replace("__NONCE__", nonce).replace("__TITLE__", html.escape(title))


FOREIGN = ("this request does not come from the page this server sent (no or wrong X-Review-Token); if the review was "
           "started again, reload the page")


def create_app(session: ReviewSession, *, title: str = "mmdomain review") -> Any:
    from fastapi import FastAPI, Header
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    token = secrets.token_urlsafe(24)
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=[HOST, "localhost"])
    no_store = {"Cache-Control": "no-store"}

    def refused(message: str, status: int) -> JSONResponse:
        return JSONResponse({"error": message, "state": session.state()}, status_code=status, headers=no_store)

    def checked(given: Optional[str]) -> bool:
        return given is not None and secrets.compare_digest(given, token)

    @app.get("/", response_class=HTMLResponse)
    def page():
        nonce = secrets.token_urlsafe(16)
        policy = (f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'unsafe-inline'; img-src 'self'; media-src 'self'; "
                  "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
        return HTMLResponse(page_html(token, nonce, title), headers={**no_store, "Content-Security-Policy": policy,
                                                                     "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})

    @app.get("/api/state")
    def state():
        return JSONResponse(session.state(), headers=no_store)

    @app.get("/media/{item_id}/{index}.{ext}")
    def media(item_id: str, index: int, ext: Literal["png", "wav"]):
        data = session.media(item_id, index, ext)
        if data is None:
            return Response(status_code=404)
        return Response(data, media_type="image/png" if ext == "png" else "audio/wav",
                        headers={**no_store, "X-Content-Type-Options": "nosniff"})

    @app.post("/api/judge")
    def judge(body: Judgement, x_review_token: Optional[str] = Header(None)):
        if not checked(x_review_token):
            return refused(FOREIGN, 403)
        try:
            written = session.judge_item(body.item, body.decision, edited=body.edited, note=body.note)
        except ReviewError as exc:
            return refused(str(exc), 409)
        return JSONResponse({"written": {k: written[k] for k in ("key", "judged_at") if k in written}, "state": session.state()},
                            headers=no_store)

    @app.post("/api/skip")
    def skip(body: Skip, x_review_token: Optional[str] = Header(None)):
        if not checked(x_review_token):
            return refused(FOREIGN, 403)
        try:
            session.skip(body.item)
        except ReviewError as exc:
            return refused(str(exc), 409)
        return JSONResponse({"state": session.state()}, headers=no_store)

    return app


def bind(port: int) -> socket.socket:
    """A listening socket on 127.0.0.1:``port`` (0: a free port), or a ReviewError naming the port and the fix."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((HOST, port))
    except OSError as exc:
        sock.close()
        raise ReviewError(f"cannot listen on {HOST}:{port} ({exc.strerror or exc}); pass another --port, or --port 0 for a free one") from None
    sock.listen(64)
    return sock


def _server(app: Any) -> Any:
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=5))


@contextmanager
def _threaded(app: Any, port: int) -> Iterator[tuple[str, threading.Thread]]:
    sock = bind(port)
    server = _server(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="review-server")
    thread.start()
    try:
        while not server.started and thread.is_alive():
            thread.join(0.02)
        if not thread.is_alive():
            raise ReviewError(f"the review server on {HOST}:{sock.getsockname()[1]} stopped while starting; see the log above")
        yield f"http://{HOST}:{sock.getsockname()[1]}/", thread
    finally:
        server.should_exit = True  # a request in flight (a judgement being written) is finished first
        thread.join(timeout=30)
        sock.close()


@contextmanager
def serving_in_thread(app: Any, port: int = 0) -> Iterator[str]:
    """The app served from a background thread (tests, notebooks); yields its URL, stops it on exit."""
    with _threaded(app, port) as (url, _):
        yield url


def serve(app: Any, port: int, on_ready: Any = None) -> None:
    """Serve until Ctrl-C or SIGTERM, then return normally (the caller closes the review and reports). uvicorn runs in
    a thread, so its own signal handling (which re-raises the signal once it has stopped, ending the process before
    anything after it runs) stays out of the way."""
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set()) if threading.current_thread() is threading.main_thread() else None
    try:
        with _threaded(app, port) as (url, thread):
            if on_ready is not None:
                on_ready(url)
            try:
                while not stop.wait(0.5) and thread.is_alive():
                    pass
            except KeyboardInterrupt:
                pass
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
