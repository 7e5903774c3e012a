package cache

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"
)

func testAEAD(t testing.TB) cipher.AEAD {
	block, err := aes.NewCipher(bytes.Repeat([]byte{3}, 32))
	if err != nil {
		t.Fatal(err)
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		t.Fatal(err)
	}
	return aead
}

// FuzzDecodeEntry feeds arbitrary bbolt keys and values, plain and sealed,
// to the record decoder: it must never panic, and what it accepts must
// carry a token and survive a re-encode.
func FuzzDecodeEntry(f *testing.F) {
	aead := testAEAD(f)
	k := NewKey("default", "biz_f", "user_f", []string{"chat:read"})
	e := newEntry(k, k.Encode())
	e.tok.Store(&Token{Value: "header.payload.sig", ExpiresAt: time.Unix(2e9, 0), ObtainedAt: time.Unix(2e9-3600, 0), Fingerprint: []byte{1, 2}})
	for _, a := range []cipher.AEAD{nil, aead} {
		rec, err := e.record(a)
		if err != nil {
			f.Fatal(err)
		}
		v, err := proto.Marshal(rec)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(k.Encode(), v, a != nil)
	}
	f.Add([]byte{1, 0, 0, 0, 0}, []byte{0x2a, 0x01, 0x78}, false)
	f.Fuzz(func(t *testing.T, key, value []byte, sealed bool) {
		a := cipher.AEAD(nil)
		if sealed {
			a = aead
		}
		got, _, err := decodeEntry(key, value, a)
		if err != nil {
			return
		}
		tok := got.Token()
		if tok == nil || tok.Value == "" {
			t.Fatal("accepted a record without a token")
		}
		rec, err := got.record(a)
		if err != nil {
			t.Fatal(err)
		}
		v, err := proto.Marshal(rec)
		if err != nil {
			t.Fatal(err)
		}
		again, _, err := decodeEntry(key, v, a)
		if err != nil || again.Token().Value != tok.Value || !again.Token().ExpiresAt.Equal(tok.ExpiresAt) {
			t.Fatalf("re-encoded record does not decode to the same token: %v", err)
		}
	})
}
