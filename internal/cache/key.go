package cache

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
)

// keyVersion leads every encoded key so the format can change without
// misreading old files.
const keyVersion = 1

// IDLen is the length of a key's printable id in hex digits.
const IDLen = 12

// Key identifies one cache entry: the credential that mints it, the subject
// and the set of scoped actions. Build it with NewKey so Scopes is canonical.
type Key struct {
	Credential string
	CompanyID  string
	UserID     string
	// Scopes is sorted and free of duplicates. Empty means every permission
	// of the credential, which is a key of its own.
	Scopes []string
}

// NewKey returns the canonical key: scopes sorted, duplicates dropped, and
// nil and empty treated alike. It does not keep a reference to scopes.
//
// Scopes that are already sorted and unique (what well-behaved clients
// send) are used as they are, without a copy: the hit path allocates
// nothing here. The caller must not modify them afterwards.
func NewKey(credential, companyID, userID string, scopes []string) Key {
	k := Key{Credential: credential, CompanyID: companyID, UserID: userID}
	switch {
	case len(scopes) == 0:
	case canonical(scopes):
		k.Scopes = scopes
	default:
		k.Scopes = slices.Compact(slices.Sorted(slices.Values(scopes)))
	}
	return k
}

func canonical(scopes []string) bool {
	for i := 1; i < len(scopes); i++ {
		if scopes[i-1] >= scopes[i] {
			return false
		}
	}
	return true
}

// Subject is the human form of the subject: company, user, or company/user.
func (k Key) Subject() string {
	switch {
	case k.CompanyID != "" && k.UserID != "":
		return k.CompanyID + "/" + k.UserID
	case k.CompanyID != "":
		return k.CompanyID
	default:
		return k.UserID
	}
}

// Encode returns the key's stable binary form: a version byte, then every
// field length-prefixed, so no choice of strings can make two keys collide.
func (k Key) Encode() []byte {
	n := 1 + 4*binary.MaxVarintLen64 + len(k.Credential) + len(k.CompanyID) + len(k.UserID)
	for _, s := range k.Scopes {
		n += binary.MaxVarintLen64 + len(s)
	}
	return k.AppendEncode(make([]byte, 0, n))
}

// AppendEncode appends the key's encoding to b, so a lookup can encode
// into a buffer on the stack.
func (k Key) AppendEncode(b []byte) []byte {
	b = append(b, keyVersion)
	b = appendString(b, k.Credential)
	b = appendString(b, k.CompanyID)
	b = appendString(b, k.UserID)
	b = binary.AppendUvarint(b, uint64(len(k.Scopes)))
	for _, s := range k.Scopes {
		b = appendString(b, s)
	}
	return b
}

func appendString(b []byte, s string) []byte {
	b = binary.AppendUvarint(b, uint64(len(s)))
	return append(b, s...)
}

// ID returns the key's short printable id: a prefix of the SHA-256 of its
// encoding, stable across restarts.
func (k Key) ID() string { return idOf(k.Encode()) }

func idOf(enc []byte) string {
	sum := sha256.Sum256(enc)
	return hex.EncodeToString(sum[:IDLen/2])
}

var errBadKey = errors.New("malformed key")

// DecodeKey parses the output of Encode. It rejects trailing bytes and
// non-canonical scope lists, so a decoded key re-encodes to the same bytes.
func DecodeKey(b []byte) (Key, error) {
	orig := b
	if len(b) == 0 || b[0] != keyVersion {
		return Key{}, fmt.Errorf("%w: unknown version", errBadKey)
	}
	b = b[1:]
	var k Key
	var err error
	if k.Credential, b, err = readString(b); err != nil {
		return Key{}, err
	}
	if k.CompanyID, b, err = readString(b); err != nil {
		return Key{}, err
	}
	if k.UserID, b, err = readString(b); err != nil {
		return Key{}, err
	}
	n, w := binary.Uvarint(b)
	if w <= 0 || n > uint64(len(b)) {
		return Key{}, fmt.Errorf("%w: bad scope count", errBadKey)
	}
	b = b[w:]
	for i := uint64(0); i < n; i++ {
		var s string
		if s, b, err = readString(b); err != nil {
			return Key{}, err
		}
		if len(k.Scopes) > 0 && s <= k.Scopes[len(k.Scopes)-1] {
			return Key{}, fmt.Errorf("%w: scopes not canonical", errBadKey)
		}
		k.Scopes = append(k.Scopes, s)
	}
	if len(b) != 0 {
		return Key{}, fmt.Errorf("%w: %d trailing bytes", errBadKey, len(b))
	}
	if !bytes.Equal(k.Encode(), orig) {
		return Key{}, fmt.Errorf("%w: not in canonical form", errBadKey)
	}
	return k, nil
}

func readString(b []byte) (string, []byte, error) {
	n, w := binary.Uvarint(b)
	if w <= 0 || n > uint64(len(b)-w) {
		return "", nil, fmt.Errorf("%w: bad length", errBadKey)
	}
	return string(b[w : w+int(n)]), b[w+int(n):], nil
}
