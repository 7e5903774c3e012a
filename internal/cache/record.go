package cache

import (
	"bytes"
	"crypto/cipher"
	"crypto/rand"
	"errors"
	"fmt"
	"time"

	"google.golang.org/protobuf/proto"

	storev1 "github.com/tokend/tokend/proto/tokend/store/v1"
)

// Record is what the store keeps of one entry. The store does not read
// meaning into its fields: what a refresh time or a failure count means is
// the refresher's business. Records are values; the store never hands out
// anything a caller could change under it.
type Record struct {
	Key         Key
	Token       string
	ExpiresAt   time.Time
	ObtainedAt  time.Time
	Fingerprint []byte // immutable once in a Record

	LastRequested time.Time
	NextRefresh   time.Time
	Hits          uint64
	Refreshes     uint64
	Failures      uint32
	LastError     *RecordError // immutable once in a Record
	// Owner names who first asked for the key, such as "uid 1000".
	Owner string
}

// RecordError is the last upstream failure kept with a record. Message is
// Whop's message or a network error, never a secret.
type RecordError struct {
	At                time.Time
	Status            int
	Message           string
	Type, Code, Param string
	Retryable         bool
}

func unixNano(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixNano()
}

func fromUnixNano(n int64) time.Time {
	if n == 0 {
		return time.Time{}
	}
	return time.Unix(0, n)
}

// encodeRecord marshals r for the bbolt key enc, sealing the token with aead
// (the key as associated data, so a sealed value cannot be moved to another
// key) when one is configured.
func encodeRecord(enc []byte, r *Record, aead cipher.AEAD) ([]byte, error) {
	p := &storev1.Record{
		Credential:      r.Key.Credential,
		CompanyId:       r.Key.CompanyID,
		UserId:          r.Key.UserID,
		ScopedActions:   r.Key.Scopes,
		Token:           r.Token,
		ExpiresAt:       unixNano(r.ExpiresAt),
		ObtainedAt:      unixNano(r.ObtainedAt),
		KeyFingerprint:  r.Fingerprint,
		LastRequestedAt: unixNano(r.LastRequested),
		NextRefreshAt:   unixNano(r.NextRefresh),
		Hits:            r.Hits,
		Refreshes:       r.Refreshes,
		Failures:        r.Failures,
		Owner:           r.Owner,
	}
	if le := r.LastError; le != nil {
		p.LastErrorAt = unixNano(le.At)
		p.LastErrorStatus = int32(le.Status)
		p.LastErrorMessage = le.Message
		p.LastErrorRetryable = le.Retryable
		p.LastErrorType, p.LastErrorCode, p.LastErrorParam = le.Type, le.Code, le.Param
	}
	if aead != nil {
		nonce := make([]byte, aead.NonceSize(), aead.NonceSize()+len(r.Token)+aead.Overhead())
		if _, err := rand.Read(nonce); err != nil {
			return nil, fmt.Errorf("seal token: %w", err)
		}
		p.SealedToken = aead.Seal(nonce, nonce, []byte(r.Token), enc)
		p.Token = ""
	}
	return proto.Marshal(p)
}

// errUnsealable marks a sealed record that the configured cache key cannot
// open: written under another key, or with no key configured now.
var errUnsealable = errors.New("sealed token cannot be opened with this cache key")

// decodeRecord rebuilds a record from its bbolt key and value. The key is
// the authority; the record's copy of it must agree.
//
// A plain record read while a cache key is configured decodes fine; the
// caller rewrites it sealed.
func decodeRecord(k, v []byte, aead cipher.AEAD) (r Record, sealed bool, err error) {
	key, err := DecodeKey(k)
	if err != nil {
		return Record{}, false, err
	}
	var p storev1.Record
	if err := proto.Unmarshal(v, &p); err != nil {
		return Record{}, false, fmt.Errorf("decode record: %w", err)
	}
	if !bytes.Equal(NewKey(p.Credential, p.CompanyId, p.UserId, p.ScopedActions).Encode(), k) {
		return Record{}, false, fmt.Errorf("record does not match its key")
	}
	if sealed = len(p.SealedToken) > 0; sealed {
		if aead == nil || len(p.SealedToken) < aead.NonceSize() {
			return Record{}, true, errUnsealable
		}
		n := aead.NonceSize()
		plain, err := aead.Open(nil, p.SealedToken[:n], p.SealedToken[n:], k)
		if err != nil {
			return Record{}, true, errUnsealable
		}
		p.Token = string(plain)
	}
	if p.Token == "" || p.ExpiresAt == 0 {
		return Record{}, sealed, fmt.Errorf("record has no token")
	}
	r = Record{
		Key:           key,
		Token:         p.Token,
		ExpiresAt:     fromUnixNano(p.ExpiresAt),
		ObtainedAt:    fromUnixNano(p.ObtainedAt),
		Fingerprint:   p.KeyFingerprint,
		LastRequested: fromUnixNano(p.LastRequestedAt),
		NextRefresh:   fromUnixNano(p.NextRefreshAt),
		Hits:          p.Hits,
		Refreshes:     p.Refreshes,
		Failures:      p.Failures,
		Owner:         p.Owner,
	}
	if p.LastErrorAt != 0 {
		r.LastError = &RecordError{
			At:        fromUnixNano(p.LastErrorAt),
			Status:    int(p.LastErrorStatus),
			Message:   p.LastErrorMessage,
			Retryable: p.LastErrorRetryable,
			Type:      p.LastErrorType,
			Code:      p.LastErrorCode,
			Param:     p.LastErrorParam,
		}
	}
	return r, sealed, nil
}
