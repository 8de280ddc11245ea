"""Connects to URL with permessage-deflate offered (Python websockets), sends a text and a
binary message that compress well, and prints what was agreed and whether the echoes were
exact, as JSON."""

import asyncio
import json
import sys

from websockets.asyncio.client import connect


async def main(url):
    text = "compress me " * 2000 + "✓"
    binary = bytes(range(256)) * 64
    async with connect(url, compression="deflate", max_size=2**24) as ws:
        agreed = ws.response.headers.get("Sec-WebSocket-Extensions")
        as_bytes = lambda m: m.encode() if isinstance(m, str) else m

        async def echo_of(message):
            # Through a tcp upstream the echo may come back in several messages.
            want = len(as_bytes(message))
            got = b""
            first = await ws.recv()
            if isinstance(first, str):
                return first
            got = first
            while len(got) < want:
                got += as_bytes(await ws.recv())
            return got

        await ws.send(text)
        got_text = await echo_of(text)
        await ws.send(binary)
        got_binary = await echo_of(binary)
    as_bytes = lambda m: m.encode() if isinstance(m, str) else m
    # A tcp upstream gives text back as bytes (binary messages): compare the bytes.
    print(json.dumps({
        "extensions": agreed,
        "text_exact": as_bytes(got_text) == text.encode(),
        "binary_exact": got_binary == binary,
    }))


asyncio.run(main(sys.argv[1]))
