"""Request fields the server refuses as 400s naming the field, checked without a server: values that used to pass
into generation and fail there as a 500 (a seed torch cannot take), decode silently otherwise (a NaN temperature
decoded greedily; an object as text reached the model as its Python repr), or cost without bound (num_beams)."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi", reason="the server needs the serve extra: pip install 'mmdomain[serve]'")

from mmdomain.serve_app import ServeLimits, request_options  # noqa: E402
from mmdomain.serve_media import MediaPolicy, RequestRefused, parse_messages  # noqa: E402


@pytest.mark.parametrize("field, value, words", [
    ("seed", 2**70, "seed must be a 64-bit integer"),
    ("temperature", float("nan"), "temperature must be a finite number"),
    ("temperature", 1e308, "temperature must be between 0 and 100"),
    ("top_p", float("inf"), "top_p must be a finite number"),
    ("num_beams", 1000, "num_beams 1000 is over this server's limit of 8 (--max-beams)"),
])
def test_out_of_range_decoding_fields_are_refused_naming_the_field(field, value, words):
    # through json as a request body is (NaN and Infinity included); top_p shapes sampling, so sampling is on
    body = json.loads(json.dumps({"temperature": 0.5, field: value} if field == "top_p" else {field: value}))
    with pytest.raises(RequestRefused, match=words.replace("(", r"\(").replace(")", r"\)")) as refused:
        request_options(body, ServeLimits())
    assert refused.value.status == 400 and refused.value.param == field


def test_the_limits_still_admit_ordinary_values():
    options = request_options({"seed": -1, "temperature": 0.7, "top_p": 0.9, "num_beams": 1}, ServeLimits())
    assert options.seed == -1 and options.do_sample and options.temperature == 0.7
    assert request_options({"num_beams": 4}, ServeLimits()).num_beams == 4


class _TextOnly:
    kinds = ()


def test_a_text_part_whose_text_is_not_a_string_is_refused():
    messages = [{"role": "user", "content": [{"type": "text", "text": {"question": "where?"}}]}]
    with pytest.raises(RequestRefused, match=r"messages\[0\]\.content\[0\]\.text must be a string, got dict"):
        parse_messages(messages, _TextOnly(), MediaPolicy())
    ok = parse_messages([{"role": "user", "content": [{"type": "text", "text": "where?"}]}], _TextOnly(), MediaPolicy())
    assert ok.conversation == [{"role": "user", "content": "where?"}]


def test_a_port_in_use_is_one_line_naming_it_before_the_run_is_read(tmp_path, capsys):
    import socket

    from mmdomain.cli import main

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        assert main(["serve", str(tmp_path / "no-run-here"), "--port", str(port)]) == 2
    finally:
        busy.close()
    err = capsys.readouterr().err.strip()
    assert f"cannot listen on 127.0.0.1:{port}" in err and "pass another --port" in err and len(err.splitlines()) == 1, err
