// Package fleet lets the tokend processes of many hosts share one Whop token
// per key through Redis (single node, Sentinel or Cluster, or anything that
// speaks the protocol), so a fleet of N hosts mints about once per key and
// lifetime instead of N times, and shares one upstream budget per credential.
//
// The package is a second cache level and a coordinator, never an owner: the
// refresher keeps every entry's life and calls Get, Lock, Await, Put,
// Allow and Pause at the points where it would otherwise mint or wait. A
// local hit never reaches this package.
//
// On a local miss or a due refresh (old is the expiry of the token held,
// zero on a miss), the refresher is expected to:
//
//  1. Get: adopt a token that expires after old.
//  2. Lock: if another host holds the lock, Await(..., old) and adopt its
//     token; when Await reports false (the holder died or failed), Lock again.
//  3. With the lock (a Redis one, or a local-only one when degraded): honour
//     Paused and Allow, mint, Put the token, Pause on a 429, then Release.
//
// # Security model
//
// Everything stored is opaque to a reader of Redis:
//   - Redis key names are "tokend:<kind>:{h}" where h is HMAC-SHA256 under a
//     sub-key of the fleet key over (credential fingerprint, caller's key),
//     truncated to 144 bits. No subject id, scope or credential appears. The
//     braces are a Cluster hash tag, so a key's token and lock share a slot.
//   - Values are sealed with AES-256-GCM under another sub-key, with the
//     Redis key name as associated data: a value copied to another key does
//     not open. The sealed record carries the token, its expiry, when it was
//     obtained and the minting credential's fingerprint; a record whose
//     fingerprint is not the caller's is refused even if it opens.
//   - Tokens expire in Redis when they expire at Whop (SET ... PXAT).
//   - Sub-keys come from the 32-byte fleet key by HKDF-SHA256 with distinct
//     labels; the key itself is never logged, only KeyID, a 4-byte keyed
//     fingerprint for checking that hosts share one key.
//
// An attacker with Redis access alone learns counts and timing (how many
// keys, when they are minted and refreshed, lock contention, pauses) and can
// delete or corrupt values, which makes hosts mint for themselves; a value
// that fails to open or carries a foreign fingerprint is counted (Tampered)
// and never served. With the fleet key as well, an attacker can read and
// forge tokens: guard the key like the API key.
//
// # Failure behaviour
//
// Redis is never a new way to fail. Every call is bounded by Config.Timeout
// (50 ms by default) and guarded by a circuit breaker: after three failures
// in a row the fleet is degraded, calls return at once (Get: a miss; Lock: a
// local-only lease so the caller mints alone; Allow and Paused: not ok, so
// the caller uses its local limiter), and a background PING with backoff
// (100 ms doubling to 5 s, with jitter) closes the breaker when Redis answers
// again. Each change of state is logged once (Warn on degrade, with the
// reason; Info on rejoin), never per call. Status reports the state and
// counters for tokenctl and metrics.
package fleet
