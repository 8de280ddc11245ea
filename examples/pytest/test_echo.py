"""A Python client through wsgate's wss:// endpoint, trusting exactly its in-memory CA."""

import asyncio
import ssl

import websockets


def test_echo_through_wss(wsgate):
    listener = wsgate["listeners"][0]
    assert listener["url"].startswith("wss://localhost:")
    tls = ssl.create_default_context(cafile=wsgate["ca"])

    async def exchange():
        async with websockets.connect(f"{listener['url']}/echo", ssl=tls) as ws:
            await ws.send(b"hello through wsgate")
            return await ws.recv()

    assert asyncio.run(exchange()) == b"hello through wsgate"


def test_an_untrusted_client_is_refused(wsgate):
    # The system's CAs do not know the gateway's: its certificate verifies for the test only.
    tls = ssl.create_default_context()

    async def attempt():
        async with websockets.connect(f"{wsgate['listeners'][0]['url']}/echo", ssl=tls):
            pass

    try:
        asyncio.run(attempt())
    except ssl.SSLCertVerificationError:
        return
    raise AssertionError("a client without the CA connected")
