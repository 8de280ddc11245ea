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
        await ws.send(text)
        got_text = await ws.recv()
        await ws.send(binary)
        got_binary = await ws.recv()
    print(json.dumps({
        "extensions": agreed,
        "text_exact": got_text == text,
        "binary_exact": got_binary == binary,
    }))


asyncio.run(main(sys.argv[1]))
