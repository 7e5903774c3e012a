package fleet

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
)

// KeySize is the length of the fleet key.
const KeySize = 32

// nameBytes is how much of the keyed hash a Redis key name keeps: 144 bits,
// far beyond any collision between a fleet's keys, and 24 base64url chars.
const nameBytes = 18

// HKDF labels: one sub-key per use, so no key serves two purposes.
const (
	labelSeal  = "tokend fleet v1 seal"
	labelNames = "tokend fleet v1 names"
	labelSalt  = "tokend fleet v1 credential salt"
	labelID    = "tokend fleet v1 key id"
)

// recordVersion is the first byte of every sealed record.
const recordVersion = 1

// keyring holds the sub-keys derived from the fleet key.
type keyring struct {
	aead  cipher.AEAD
	names []byte // HMAC key for Redis key names
	salt  []byte // returned by Salt, for credential fingerprints
	id    string // hex of a 4-byte keyed fingerprint of the fleet key
}

func deriveKeys(master []byte) (*keyring, error) {
	if len(master) != KeySize {
		return nil, fmt.Errorf("fleet key: %d bytes, want exactly %d random bytes", len(master), KeySize)
	}
	derive := func(label string, n int) []byte {
		k, err := hkdf.Key(sha256.New, master, nil, label, n)
		if err != nil { // only for lengths beyond 255*32 bytes
			panic(fmt.Sprintf("fleet: hkdf %s: %v", label, err))
		}
		return k
	}
	block, err := aes.NewCipher(derive(labelSeal, 32))
	if err != nil {
		return nil, fmt.Errorf("fleet key: aes: %w", err)
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, fmt.Errorf("fleet key: gcm: %w", err)
	}
	return &keyring{
		aead:  aead,
		names: derive(labelNames, 32),
		salt:  derive(labelSalt, 32),
		id:    hex.EncodeToString(derive(labelID, 4)),
	}, nil
}

// Domains of the keyed hash, so a credential-wide name can never equal the
// name of one key under that credential.
const (
	domainEntry = 'e'
	domainCred  = 'c'
)

// hash is the keyed hash behind every Redis key name. The credential is
// length-prefixed (not separated by a 0 byte) because a fingerprint may
// contain 0 bytes, which would make (cred, key) pairs ambiguous.
func (k *keyring) hash(domain byte, cred []byte, key string) string {
	m := hmac.New(sha256.New, k.names)
	var hdr [5]byte
	hdr[0] = domain
	binary.BigEndian.PutUint32(hdr[1:], uint32(len(cred)))
	m.Write(hdr[:])
	m.Write(cred)
	m.Write([]byte(key))
	return base64.RawURLEncoding.EncodeToString(m.Sum(nil)[:nameBytes])
}

// entryNames are the Redis names for one key of one credential.
type entryNames struct{ tok, lock string }

func (k *keyring) entry(cred []byte, key string) entryNames {
	h := "{" + k.hash(domainEntry, cred, key) + "}"
	return entryNames{tok: "tokend:tok:" + h, lock: "tokend:lock:" + h}
}

// credNames are the Redis names shared by every key of one credential.
type credNames struct{ rate, pause string }

func (k *keyring) cred(cred []byte) credNames {
	h := "{" + k.hash(domainCred, cred, "") + "}"
	// redis_rate prefixes its keys with "rate:" itself.
	return credNames{rate: "tokend:" + h, pause: "tokend:pause:" + h}
}

// record is what a sealed value holds: a token (a = expiry, b = obtained)
// or a pause (a = until, text = why); times in Unix nanoseconds.
type record struct {
	cred []byte
	a, b int64
	text string
}

func (r record) marshal() []byte {
	out := make([]byte, 0, 1+2+len(r.cred)+16+len(r.text))
	out = append(out, recordVersion)
	out = binary.BigEndian.AppendUint16(out, uint16(len(r.cred)))
	out = append(out, r.cred...)
	out = binary.BigEndian.AppendUint64(out, uint64(r.a))
	out = binary.BigEndian.AppendUint64(out, uint64(r.b))
	return append(out, r.text...)
}

var errRecord = errors.New("malformed record")

func unmarshalRecord(p []byte) (record, error) {
	if len(p) < 3 || p[0] != recordVersion {
		return record{}, errRecord
	}
	n := int(binary.BigEndian.Uint16(p[1:3]))
	p = p[3:]
	if len(p) < n+16 {
		return record{}, errRecord
	}
	r := record{cred: p[:n]}
	p = p[n:]
	r.a = int64(binary.BigEndian.Uint64(p))
	r.b = int64(binary.BigEndian.Uint64(p[8:]))
	r.text = string(p[16:])
	return r, nil
}

// seal encrypts r for the Redis key name, which is the associated data: a
// sealed value opens only under the name it was written to. Nonces are
// random (12 bytes): at a fleet's rate of writes (thousands an hour) the
// 2^32-message bound for random GCM nonces under one key is centuries away.
func (k *keyring) seal(name string, r record) []byte {
	ns := k.aead.NonceSize()
	out := make([]byte, ns, ns+len(r.cred)+64+len(r.text))
	if _, err := rand.Read(out); err != nil {
		panic(fmt.Sprintf("fleet: crypto/rand: %v", err)) // never fails on Linux
	}
	return k.aead.Seal(out, out, r.marshal(), []byte(name))
}

// errForeign is a value that opened but was written for another credential.
var errForeign = errors.New("record of another credential")

// open decrypts a value read under name and checks that it belongs to cred.
func (k *keyring) open(name string, cred, sealed []byte) (record, error) {
	ns := k.aead.NonceSize()
	if len(sealed) < ns+k.aead.Overhead() {
		return record{}, errRecord
	}
	p, err := k.aead.Open(nil, sealed[:ns], sealed[ns:], []byte(name))
	if err != nil {
		return record{}, err
	}
	r, err := unmarshalRecord(p)
	if err != nil {
		return record{}, err
	}
	if subtle.ConstantTimeCompare(r.cred, cred) != 1 {
		return record{}, errForeign
	}
	return r, nil
}
