"""What many tests share, in one place.

- ``accounts``: the test password, HTTP clients of a server, registering and logging in;
- ``devices``: a device that is a real aiomqtt client, and the signature check of its events;
- ``paho``: a paho-mqtt client on its own network thread, bridged into asyncio;
- ``ports``: a free TCP port;
- ``processes``: ``mqchat serve`` as a subprocess;
- ``services``: skipping (or, in CI, failing) when a service the test needs is missing;
- ``browser``: the Chromium fixtures of the browser tests (a pytest plugin, see tests/conftest.py).
"""
