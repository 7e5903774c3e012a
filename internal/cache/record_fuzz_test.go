package cache

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"reflect"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	storev1 "github.com/tokend/tokend/proto/tokend/store/v1"
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
// to decodeRecord: it must never panic, and what it accepts must belong to
// its key, carry a token and an expiry, and come back the same through
// encodeRecord and decodeRecord again. (The name predates Record; CI runs
// the target by it.)
func FuzzDecodeEntry(f *testing.F) {
	aead := testAEAD(f)
	full := fullRecord()
	minimal := Record{Key: NewKey("default", "", "user_f", nil), Token: "header.payload.sig", ExpiresAt: time.Unix(2e9, 0)}
	for _, r := range []Record{full, minimal} {
		for _, a := range []cipher.AEAD{nil, aead} {
			k := r.Key.Encode()
			v, err := encodeRecord(k, &r, a)
			if err != nil {
				f.Fatal(err)
			}
			f.Add(k, v, a != nil)
		}
	}
	f.Add([]byte{1, 0, 0, 0, 0}, []byte{0x2a, 0x01, 0x78}, false)
	f.Fuzz(func(t *testing.T, key, value []byte, sealed bool) {
		a := cipher.AEAD(nil)
		if sealed {
			a = aead
		}
		got, _, err := decodeRecord(key, value, a)
		if err != nil {
			return
		}
		if got.Token == "" || got.ExpiresAt.IsZero() {
			t.Fatalf("accepted a record without a token or an expiry: %s", fmtRecord(got))
		}
		if !bytes.Equal(got.Key.Encode(), key) {
			t.Fatalf("record decoded under key %x carries key %x", key, got.Key.Encode())
		}
		v, err := encodeRecord(key, &got, a)
		if err != nil {
			t.Fatalf("re-encode: %v", err)
		}
		var p storev1.Record
		if err := proto.Unmarshal(v, &p); err != nil {
			t.Fatalf("re-encoded value does not unmarshal: %v", err)
		}
		if wantSealed := a != nil; (len(p.SealedToken) > 0) != wantSealed || (p.Token == "") != wantSealed {
			t.Fatalf("re-encoded with sealing %v: token %q, %d sealed bytes", wantSealed, p.Token, len(p.SealedToken))
		}
		again, resealed, err := decodeRecord(key, v, a)
		if err != nil {
			t.Fatalf("re-encoded record does not decode: %v", err)
		}
		if resealed != (a != nil) {
			t.Fatalf("re-encoded record: sealed = %v, want %v", resealed, a != nil)
		}
		if g, w := canon(again), canon(got); !reflect.DeepEqual(g, w) {
			t.Fatalf("round trip changed the record:\n got %s\nwant %s", fmtRecord(g), fmtRecord(w))
		}
	})
}
