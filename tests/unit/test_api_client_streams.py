"""The API client's reading of streamed bodies, piece by piece as the network cuts them."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator

from nomad_client.api.client import _stream_frames


async def _chunks(body: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start:start + size]


async def test_frames_are_read_whatever_bytes_a_chunk_ends_on() -> None:
    # As Nomad's Go encoder writes them: a non-ASCII file name raw, in UTF-8.
    frames = [{"Offset": 0, "Data": base64.b64encode(b"hello").decode(), "File": "é/ü.log"},
              {}, {"Offset": 5, "Data": "", "File": "é/ü.log", "FileEvent": "file deleted"}]
    body = "".join(json.dumps(f, ensure_ascii=False) for f in frames).encode()
    for size in (1, 2, 3, 7, len(body)):
        read = [frame async for frame in _stream_frames(_chunks(body, size))]
        assert [(f["Offset"], f["Data"], f["File"]) for f in read] == [
            (0, b"hello", "é/ü.log"), (5, b"", "é/ü.log")], size
        assert read[1]["FileEvent"] == "file deleted"
