"""The browser page's signature check (``mqchat/api/static/origin.js``) against Python's.

Run with node: its SHA-256 and HMAC against ``hashlib``/``hmac`` over many lengths (block
edges included), and its whole check, with its own HMAC and with Web Crypto, against payloads
signed by ``mqchat.core.origin``, forged ones and altered ones.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import random
import shutil
import subprocess
from pathlib import Path

import mqchat.api
from mqchat.core.origin import event_key, sign, verify
from tests.support.services import service_missing as _service_missing

ORIGIN_JS = Path(mqchat.api.__file__).parent / "static" / "origin.js"

RUNNER = """
const origin = require(process.argv[1]);
const hex = (bytes) => Buffer.from(bytes).toString("hex");
const bytes = (text) => new Uint8Array(Buffer.from(text, "hex"));
(async () => {
  const cases = JSON.parse(require("fs").readFileSync(0, "utf8"));
  const out = { sha256: [], hmac: [], verify: [] };
  for (const data of cases.sha256) out.sha256.push(hex(origin.sha256(bytes(data))));
  for (const [key, message] of cases.hmac) out.hmac.push(hex(origin.hmacSha256(bytes(key), bytes(message))));
  const verifiers = {};
  for (const [key, payload] of cases.verify) {
    verifiers[key] ??= await Promise.all([
      origin.makeVerifier(bytes(key), { useWebCrypto: false }),
      origin.makeVerifier(bytes(key)),
    ]);
    const [js, webcrypto] = verifiers[key];
    if (js.engine !== "js" || webcrypto.engine !== "webcrypto") throw new Error("engines");
    const results = [await js(bytes(payload)), await webcrypto(bytes(payload))];
    out.verify.push(results.map((body) => (body === null ? null : hex(body))));
  }
  process.stdout.write(JSON.stringify(out));
})();
"""


def run_node(cases: dict[str, list[object]]) -> dict[str, list[object]]:
    node = shutil.which("node")
    if node is None:
        _service_missing("node is not installed")
    assert node is not None
    answer = subprocess.run(
        [node, "-e", RUNNER, str(ORIGIN_JS)], input=json.dumps(cases), capture_output=True, text=True, check=True
    )
    result: dict[str, list[object]] = json.loads(answer.stdout)
    return result


def test_sha256_and_hmac_agree_with_python() -> None:
    rng = random.Random(11)
    lengths = [*range(0, 130), 183, 184, 191, 192, 1000, 65_536]
    data = [rng.randbytes(n) for n in lengths]
    keys = [rng.randbytes(n) for n in (0, 1, 31, 32, 33, 63, 64, 65, 200)]
    pairs = [(key, message) for key in keys for message in data[::7]]
    got = run_node({"sha256": [d.hex() for d in data], "hmac": [[k.hex(), m.hex()] for k, m in pairs], "verify": []})
    assert got["sha256"] == [hashlib.sha256(d).hexdigest() for d in data]
    assert got["hmac"] == [hmac.new(k, m, "sha256").hexdigest() for k, m in pairs]


def test_the_check_agrees_with_the_server_s_on_signed_forged_and_altered_payloads() -> None:
    bob = event_key(b"server secret", "bob")
    carol = event_key(b"server secret", "carol")
    rng = random.Random(5)
    payloads: list[tuple[bytes, bytes]] = []
    for n in range(40):
        fields = {
            "type": "new_message",
            "seq": n,
            "content": "".join(rng.choice('ab ,"\\:}{sig\u00e9\U0001f600') for _ in range(rng.randrange(0, 80))),
        }
        body = json.dumps(fields, ensure_ascii=n % 2 == 0, separators=(",", ":")).encode()
        signed = sign(bob, body)
        payloads += [(bob, signed), (carol, signed), (bob, body)]  # the server's, another key's, unsigned
        flipped = bytearray(signed)
        flipped[rng.randrange(len(flipped))] ^= 0x01
        payloads.append((bob, bytes(flipped)))
    # An earlier "sig" (in a nested object) does not confuse it: only the last field counts.
    tricky = sign(bob, b'{"type":"sync_response","events":[{"seq":1,"sig":"inner"}],"latest_seq":1}')
    payloads += [
        (bob, tricky),
        (bob, b'{"sig":"' + base64.urlsafe_b64encode(b"\0" * 32).rstrip(b"=") + b'"}'),
        (bob, b'{"a":1,"sig":"short"}'),
        (bob, b""),
        (bob, b'"}'),
    ]

    got = run_node({"sha256": [], "hmac": [], "verify": [[key.hex(), payload.hex()] for key, payload in payloads]})
    expected = [verify(key, payload) for key, payload in payloads]
    assert [[None if b is None else bytes.fromhex(str(b)) for b in pair] for pair in got["verify"]] == [
        [body, body] for body in expected
    ]
    verified = sum(body is not None for body in expected)
    assert verified == 41 and verify(bob, tricky) is not None  # the test does test both outcomes


def test_the_page_loads_it_before_app_js() -> None:
    index = (ORIGIN_JS.parent / "index.html").read_text()
    assert index.index("/static/origin.js") < index.index("/static/app.js")  # defer keeps this order
