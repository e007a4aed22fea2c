"use strict";
// Telling the server's events from forgeries (docs/protocol.md, "Event signatures"). Every event
// on the user's stream and device topics ends with "sig": HMAC-SHA256 under the user's event key
// of the payload without that field, base64url without padding. The check uses Web Crypto where
// it exists; crypto.subtle exists only in secure contexts (https, or http on localhost), so a page
// served over plain http from another host uses the small SHA-256 below. Also loaded by node in
// the tests (module.exports), which compare it with Python's hmac.

(function (root) {
  const K = new Uint32Array([
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
  ]);
  const ror = (x, n) => (x >>> n) | (x << (32 - n));

  /** SHA-256 (FIPS 180-4) of a Uint8Array. */
  function sha256(data) {
    const blocks = Math.ceil((data.length + 9) / 64);
    const padded = new Uint8Array(blocks * 64);
    padded.set(data);
    padded[data.length] = 0x80;
    const view = new DataView(padded.buffer);
    view.setUint32(padded.length - 8, Math.floor(data.length / 0x20000000)); // the length in bits, high word
    view.setUint32(padded.length - 4, (data.length << 3) >>> 0);
    const hash = new Uint32Array([
      0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
    ]);
    const w = new Uint32Array(64);
    for (let offset = 0; offset < padded.length; offset += 64) {
      for (let i = 0; i < 16; i++) w[i] = view.getUint32(offset + 4 * i);
      for (let i = 16; i < 64; i++) {
        const s0 = ror(w[i - 15], 7) ^ ror(w[i - 15], 18) ^ (w[i - 15] >>> 3);
        const s1 = ror(w[i - 2], 17) ^ ror(w[i - 2], 19) ^ (w[i - 2] >>> 10);
        w[i] = (w[i - 16] + s0 + w[i - 7] + s1) >>> 0;
      }
      let [a, b, c, d, e, f, g, h] = hash;
      for (let i = 0; i < 64; i++) {
        const t1 = (h + (ror(e, 6) ^ ror(e, 11) ^ ror(e, 25)) + ((e & f) ^ (~e & g)) + K[i] + w[i]) >>> 0;
        const t2 = ((ror(a, 2) ^ ror(a, 13) ^ ror(a, 22)) + ((a & b) ^ (a & c) ^ (b & c))) >>> 0;
        [h, g, f, e, d, c, b, a] = [g, f, e, (d + t1) >>> 0, c, b, a, (t1 + t2) >>> 0];
      }
      [a, b, c, d, e, f, g, h].forEach((value, i) => { hash[i] = (hash[i] + value) >>> 0; });
    }
    const out = new Uint8Array(32);
    const outView = new DataView(out.buffer);
    hash.forEach((value, i) => outView.setUint32(4 * i, value));
    return out;
  }

  /** HMAC-SHA256 (RFC 2104) of Uint8Arrays. */
  function hmacSha256(key, message) {
    const block = new Uint8Array(64);
    block.set(key.length > 64 ? sha256(key) : key);
    const inner = new Uint8Array(64 + message.length);
    const outer = new Uint8Array(64 + 32);
    for (let i = 0; i < 64; i++) {
      inner[i] = block[i] ^ 0x36;
      outer[i] = block[i] ^ 0x5c;
    }
    inner.set(message, 64);
    outer.set(sha256(inner), 64);
    return sha256(outer);
  }

  function base64url(bytes) {
    let binary = "";
    for (const byte of bytes) binary += String.fromCharCode(byte);
    return btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }

  function decodeBase64url(text) {
    const binary = atob(text.replace(/-/g, "+").replace(/_/g, "/") + "=".repeat((4 - (text.length % 4)) % 4));
    return Uint8Array.from(binary, (c) => c.charCodeAt(0));
  }

  const SIG_OPEN = Array.from(',"sig":"', (c) => c.charCodeAt(0));
  const QUOTE = 0x22;
  const CLOSE = 0x7d; // }

  /** The payload cut at its last ',"sig":"': {body, sig}, body being the payload without the
   * field (exactly the bytes the server signed), or null when there is no sig at the end. */
  function splitSig(payload) {
    const n = payload.length;
    if (n < SIG_OPEN.length + 3 || payload[n - 1] !== CLOSE || payload[n - 2] !== QUOTE) return null;
    search: for (let cut = n - 2 - SIG_OPEN.length; cut >= 1; cut--) {
      for (let i = 0; i < SIG_OPEN.length; i++) if (payload[cut + i] !== SIG_OPEN[i]) continue search;
      const body = new Uint8Array(cut + 1);
      body.set(payload.subarray(0, cut));
      body[cut] = CLOSE;
      let sig = "";
      for (let i = cut + SIG_OPEN.length; i < n - 2; i++) sig += String.fromCharCode(payload[i]);
      return { body, sig };
    }
    return null;
  }

  function sameText(a, b) {
    if (a.length !== b.length) return false;
    let diff = 0;
    for (let i = 0; i < a.length; i++) diff |= a.charCodeAt(i) ^ b.charCodeAt(i);
    return diff === 0;
  }

  /** An async check for one event key (Uint8Array): payload -> the body without "sig" if the
   * sig is the server's, else null. Its .engine says which HMAC it uses. */
  async function makeVerifier(key, { useWebCrypto = true } = {}) {
    const subtle = useWebCrypto ? root.crypto?.subtle : undefined;
    let mac;
    if (subtle) {
      const cryptoKey = await subtle.importKey("raw", key, { name: "HMAC", hash: "SHA-256" }, false, ["sign"]);
      mac = async (body) => new Uint8Array(await subtle.sign("HMAC", cryptoKey, body));
    } else {
      mac = async (body) => hmacSha256(key, body);
    }
    const verify = async (payload) => {
      const parts = splitSig(payload);
      if (parts === null) return null;
      return sameText(base64url(await mac(parts.body)), parts.sig) ? parts.body : null;
    };
    verify.engine = subtle ? "webcrypto" : "js";
    return verify;
  }

  const api = { sha256, hmacSha256, base64url, decodeBase64url, splitSig, makeVerifier };
  root.mqchatOrigin = api;
  if (typeof module === "object" && module.exports) module.exports = api;
})(globalThis);
